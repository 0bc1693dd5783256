"""ftops_inference: serves one base model with many hot-loaded LoRA adapter versions."""
