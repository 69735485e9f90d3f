"""fedfar: federated edge fine-tuning of BERT-like models with FAR (Freeze And Reconfigure)."""

__version__ = "0.1.0"
