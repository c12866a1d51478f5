"""PEFT tuners of st-peft; importing this package registers them with PEFT."""
