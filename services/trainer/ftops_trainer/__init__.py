"""ftops trainer: incremental LoRA fine-tuning jobs that end as registered adapter versions."""
