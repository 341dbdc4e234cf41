"""The train stage: ``config`` (TrainConfig), ``schedule`` (what the dataset statistics decide),
``engine`` (ds_config, AdamW + warmup, fp16 watch), ``trainer`` (the loop), ``ema``, ``state`` (the
TrainerState of a checkpoint), ``checkpoint`` (atomic saves, retention), ``resume`` (what may change on
resume), ``evaluation`` (fixed-batch EMA-vs-raw loss), ``preview`` (tensorboard sample grids), ``tb``
(metrics), ``signals`` (preemption, test faults) and ``export`` (the stage's last step)."""
