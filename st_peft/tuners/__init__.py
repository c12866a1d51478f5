"""PEFT tuners of st-peft; importing this package registers them with PEFT."""
import st_peft.tuners.factost  # noqa: F401  (registers FACTOST)
import st_peft.tuners.st_lora  # noqa: F401  (registers STLORA)
