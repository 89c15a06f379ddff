"""The shard format and its build: names, manifest and checks (`format`), the arrays' codecs (`codecs`), tar
files (`tar`), where a set's bytes come from (`sources`), the two sample kinds (`chunk_samples`,
`seg_samples`), the build (`options`, `inputs`, `output`, `writer`, `build`) and its plan (`plan`)."""

from luna_dist.common.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "BuildOptions": "luna_dist.shards.options",
    "BuildError": "luna_dist.shards.options",
    "build_shards": "luna_dist.shards.build:build",
    "plan_shards": "luna_dist.shards.plan:plan",
    "format_plan": "luna_dist.shards.plan",
    "ShardSetError": "luna_dist.shards.format",
    "chunk_samples": "luna_dist.shards.chunk_samples",
    "seg_samples": "luna_dist.shards.seg_samples",
})
