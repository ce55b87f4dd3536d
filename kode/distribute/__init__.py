"""``tf.distribute`` strategies, devices and cluster descriptions (:mod:`kode.distribute.strategy`).

The training loop for strategies ``fit`` cannot drive is :mod:`kode.training.custom_loop`;
resuming interrupted runs is :mod:`kode.training.resume`.
"""

from kode.distribute.strategy import (
    PRECISIONS,
    STRATEGIES,
    configure_cpu_devices,
    describe_devices,
    make_strategy,
    parse_tf_config,
    synchronize_batchnorm,
)

__all__ = ["PRECISIONS", "STRATEGIES", "configure_cpu_devices", "describe_devices",
           "make_strategy", "parse_tf_config", "synchronize_batchnorm"]
