"""compactgpt.io: atomic writes and the one JSON reader with typed errors."""

import pytest

from compactgpt.errors import ArtifactError
from compactgpt.io import atomic_write_json, read_json


def test_read_json_returns_the_value_and_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "settings.json"
    atomic_write_json(path, {"a": [1, 2]})
    assert read_json(path, "settings", "rerun the stage") == {"a": [1, 2]}
    for content, problem in ((None, "is missing"), ("{not json", "is not valid JSON"),
                             ("[1, 2]", "holds a JSON list, not settings"), (b"\xff\xfe", "could not be read")):
        if content is None:
            path.unlink(missing_ok=True)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        with pytest.raises(ArtifactError) as info:
            read_json(path, "settings", "rerun the stage", dict)
        message = str(info.value)
        assert message.startswith(str(path)) and problem in message and message.endswith("rerun the stage")
        assert "\n" not in message and info.value.__cause__ is None
