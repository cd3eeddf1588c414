"""Integrations with training frameworks (Hugging Face ``Trainer``: :mod:`.trainer`)."""
