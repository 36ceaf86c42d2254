"""SpecSummary: Lightning's model summary, with the FLOPs of the spec instead of a measured zero."""

import logging

import lightning as L
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table, get_human_readable_count

from soma_lightning.measure import count_parameters, train_flops_per_token

log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


class SpecSummary(ModelSummary):
    """Lightning counts FLOPs by running the module's `example_input_array`; SomaLM has none (its inputs are a
    batch dict), so Lightning's table showed a FLOPs column of zeros and "0 Total Flops". This one drops the
    column and ends with the parameters active per token and the training FLOPs per token of measure.py, the
    numbers `soma-lightning inspect` and the throughput callback use."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._module = pl_module
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, **kwargs) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes, 0, *columns)
        table = table[: table.rindex("\n")]  # its last line is Lightning's FLOPs total
        model, seq_len = self._module.model, self._module.arch.max_seq_len
        active = count_parameters(model)[1]
        table += f"\n{get_human_readable_count(active):<10}Active params per token"
        table += f"\n{get_human_readable_count(int(train_flops_per_token(model, seq_len))):<10}Training FLOPs per token (seq_len {seq_len})"
        log.info("\n" + table)
