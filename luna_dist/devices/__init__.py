"""The user's device, checked before it is trusted: the machine (`machine`), every operation the models and the
augmentation run (`ops`), the models' numbers against the CPU (`numbers`, by the `tolerances`), the speed of the
device and of a data worker (`speed`), and the check of every run's start (`start`). `python -m luna_dist.doctor`
runs them all."""

from luna_dist.common.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "facts": "luna_dist.devices.machine",
    "check_ops": "luna_dist.devices.ops",
    "check_model": "luna_dist.devices.numbers",
    "start_check": "luna_dist.devices.start",
    "DeviceCheckError": "luna_dist.devices.start",
    "recommend_workers": "luna_dist.devices.speed",
    "device_rate": "luna_dist.devices.speed",
    "worker_rate": "luna_dist.devices.speed",
})
