"""folder_kind as the application asks it: with the kind of folder every stage writes known.

Each package registers the kind of folder it writes when it is imported
(compactgpt.artifacts.register_folder_kind); the application is the one layer that imports
every stage, so its modules ask folder_kind through here.
"""

import compactgpt.data  # noqa: F401  (each import registers its package's kind of folder)
import compactgpt.finetune  # noqa: F401
import export  # noqa: F401  (it imports quantize, whose kind it tells apart)

from ..artifacts import FOLDER_KINDS, folder_kind
from . import deploy  # noqa: F401

__all__ = ["FOLDER_KINDS", "folder_kind"]
