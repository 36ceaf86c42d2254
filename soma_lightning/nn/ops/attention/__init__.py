"""Attention ops: see soma_lightning/nn/ops/__init__.py for what each module holds."""
