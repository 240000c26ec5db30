"""Compatibility module: the code of ``diffmath.data`` lives in ``diffmath.pipeline.data``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.data import (  # noqa: F401
    GMM_MODES,
    HELD_OUT_PER_CLASS,
    IMAGE_EXTENSIONS,
    SIXTEEN_BIT_MODES,
    TOY_DATASETS,
    Data,
    __all__,  # noqa: F401, E402  (the same list)
    folder_labels,
    gaussian_mixture,
    gmm_means,
    load_data,
    load_digits,
    load_image_folder,
    swiss_roll,
    to_8bit_grey,
)
