"""luna_dist: lung-nodule models on LUNA16-format CT data, from one laptop to a GPU cluster.

The commands (`python -m luna_dist.shard`, `.train`, `.evaluate`, `.analyze`, `.synth`, `.rehearsal`,
`.bench`, `.doctor`, `.protocol`, `.docs`) are modules of this package; the library is its subpackages, each
layer using only those below it (docs/library.md):

    common < tables < imaging, synthetic < shards < data < models, evaluation < devices < training, analysis
           < benchmarks < cv < the commands < protocol

What a user may import is named here and in each subpackage's `__all__`; every other name is private.
"""

from luna_dist.common.lazy import exports

__version__ = "0.2.0"

__all__, __getattr__, __dir__ = exports(__name__, {
    # a CT and its geometry
    "read_ct": "luna_dist.imaging.ct", "find_ct": "luna_dist.imaging.ct", "Ct": "luna_dist.imaging.ct",
    "CtError": "luna_dist.imaging.files", "Geometry": "luna_dist.imaging.geometry",
    "xyz_to_irc": "luna_dist.imaging.geometry", "irc_to_xyz": "luna_dist.imaging.geometry",
    # the tables, and synthetic data in their layout
    "read_candidates": "luna_dist.tables.candidates", "read_annotations": "luna_dist.tables.candidates",
    "make_dataset": "luna_dist.synthetic.generator",
    # shards: built, planned, opened, loaded
    "BuildOptions": "luna_dist.shards.options", "build_shards": "luna_dist.shards.build:build",
    "plan_shards": "luna_dist.shards.plan:plan", "format_plan": "luna_dist.shards.plan",
    "open_shard_set": "luna_dist.data.streams",
    "train_loader": "luna_dist.data.loaders", "val_loader": "luna_dist.data.loaders",
    # the models, their training, the analysis of a CT, LUNA16's scores
    "LunaModel": "luna_dist.models.classifier", "SegmentationModel": "luna_dist.models.unet",
    "load_weights": "luna_dist.models.weights", "Trainer": "luna_dist.training.trainer",
    "TASKS": "luna_dist.training.tasks", "analyze_ct": "luna_dist.analysis.detect",
    "Models": "luna_dist.analysis.detect", "froc": "luna_dist.evaluation.luna16",
    "Findings": "luna_dist.evaluation.luna16", "Marks": "luna_dist.evaluation.luna16",
})
