"""Self-describing artifact folders.

A model artifact *is* a Hugging Face GPT-2 folder:

    config.json            model_type "gpt2", GPT2Config fields
    model.safetensors      GPT-2 tensor names and Conv1D layouts (lm_head tied, left out)
    tokenizer.json         plus tokenizer_config.json and special_tokens_map.json
    manifest.json          CompactGPT's record: stage, settings, parent and its hash,
                           library versions, metrics, and the sha256 of every file

so `transformers.GPT2LMHeadModel.from_pretrained(folder)` loads it, and a folder saved by
transformers loads here. Writes are atomic: a `.incomplete` marker is written first and the
manifest is removed, every file is written to a temporary name and renamed, the manifest is
written last and the marker removed. A folder with the marker never loads.

    manifest.py   the manifest, file names, content hashes, parent records
    writing.py    the write protocol: begin_write, finish_write, update_metrics
    hf_config.py  config.json <-> GPTConfig
    weights.py    model.safetensors: write, read, header checks against the config
    loading.py    save_model, load_model
    hub.py        a local folder or a Hugging Face hub id
    kinds.py      folder_kind, and the registry each stage adds its kind of folder to
"""

from .hf_config import CLASSIFIER_ARCH, config_from_hf, config_json, hf_config_dict, is_classifier, read_config
from .hub import resolve_model_path
from .kinds import FOLDER_KINDS, FolderFiles, folder_kind, register_folder_kind
from .loading import LoadedModel, load_model, refuse_non_float, save_model, verify_files
from .manifest import (FORMAT, FORMAT_VERSION, INCOMPLETE, MANIFEST, RELATIVE_PATHS, WEIGHTS, Manifest, check_complete,
                       folder_hash, library_versions, parent_record, read_manifest, resolved_parent)
from .weights import (DAMAGED, FLOAT_DTYPES, HF_BUFFERS, check_config_size, check_float_weights, check_tensor,
                      hf_name, hf_shapes, implied_parameters, meta_model, read_header, read_weights, weights_file,
                      write_weights)
from .writing import begin_write, finish_write, read_marker, update_metrics

__all__ = ["CLASSIFIER_ARCH", "DAMAGED", "FLOAT_DTYPES", "FOLDER_KINDS", "FORMAT", "FORMAT_VERSION", "HF_BUFFERS",
           "INCOMPLETE", "MANIFEST", "RELATIVE_PATHS", "WEIGHTS", "FolderFiles", "LoadedModel", "Manifest",
           "begin_write", "check_complete", "check_config_size", "check_float_weights", "check_tensor",
           "config_from_hf", "config_json", "finish_write", "folder_hash", "folder_kind", "hf_config_dict",
           "hf_name", "hf_shapes", "implied_parameters", "is_classifier", "library_versions", "load_model",
           "meta_model", "parent_record", "read_config", "read_header", "read_manifest", "read_marker",
           "read_weights", "refuse_non_float", "register_folder_kind", "resolve_model_path", "resolved_parent",
           "save_model", "update_metrics", "verify_files", "weights_file", "write_weights"]
