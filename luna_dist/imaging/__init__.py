"""CTs: any format read as int16 HU in LUNA16's orientation (`ct`, with `files` and `dicom` checking them first),
patient geometry (`geometry`), chunks around given centres (`chunks`), nodule masks (`masks`)."""

from luna_dist.common.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "Ct": "luna_dist.imaging.ct",
    "read_ct": "luna_dist.imaging.ct",
    "find_ct": "luna_dist.imaging.ct",
    "MAX_CT_VOXELS": "luna_dist.imaging.ct",
    "HU_MIN": "luna_dist.imaging.ct",
    "HU_MAX": "luna_dist.imaging.ct",
    "CtSource": "luna_dist.imaging.files",
    "CtError": "luna_dist.imaging.files",
    "Geometry": "luna_dist.imaging.geometry",
    "xyz_to_irc": "luna_dist.imaging.geometry",
    "irc_to_xyz": "luna_dist.imaging.geometry",
    "LPS": "luna_dist.imaging.geometry",
    "CHUNK_SHAPE": "luna_dist.imaging.chunks",
    "cut_chunks": "luna_dist.imaging.chunks",
})
