"""transformers models of st-peft; importing this package registers them with the Auto classes."""
