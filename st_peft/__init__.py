"""st-peft: spatio-temporal forecasting in the Hugging Face stack.

Importing this package registers the PEFT methods (``STLORA``, ``FACTOST``) and the
transformers models (``factost``, ``st_link``) with their Auto classes.
"""

import st_peft.models  # noqa: F401  (registers the transformers models)
import st_peft.tuners  # noqa: F401  (registers the PEFT methods)
from st_peft.outputs import ForecastOutput

__version__ = "0.1.0"

__all__ = ["ForecastOutput", "__version__"]
