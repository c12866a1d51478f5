"""The front of the ``st-peft`` console script, on the standard library alone.

``st-peft --help``, ``--version`` and every mistake in the arguments are answered by
:mod:`st_peft_cli.parser`, in a fraction of a second: nothing under ``st_peft`` is imported until the
arguments parse, because importing it registers the PEFT methods and so imports torch, transformers
and peft (about 10 s). A parsed command then runs in :func:`st_peft.cli.run`. The options themselves
are declared once, in :mod:`st_peft_cli.options`. ``python -m st_peft_cli`` is the console script.
"""

__version__ = "0.1.0"
