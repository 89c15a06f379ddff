"""The speed figures of `python -m luna_dist.bench`: the build (`build`), the loader (`loader`), training
(`training`), the analysis (`analysis`) and the scoring (`scoring`). Nothing here is public."""
