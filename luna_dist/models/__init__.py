"""The networks: the nodule classifier (`classifier`), the segmentation UNet (`unet`), their weights (`weights`), and
what each saw (`provenance`)."""

from luna_dist.common.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "LunaModel": "luna_dist.models.classifier",
    "SegmentationModel": "luna_dist.models.unet",
    "load_weights": "luna_dist.models.weights",
    "load_into": "luna_dist.models.weights",
    "WeightsError": "luna_dist.models.weights",
    "Provenance": "luna_dist.models.provenance",
    "read_provenance": "luna_dist.models.provenance:read",
})
