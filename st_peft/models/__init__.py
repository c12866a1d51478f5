"""transformers models of st-peft; importing this package registers them with the Auto classes."""

from st_peft.models import (
    factost,  # noqa: F401
    st_link,  # noqa: F401
)
