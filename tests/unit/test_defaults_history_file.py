"""The defaults history that rollback reads: a damaged file is one line naming it."""

from __future__ import annotations

import pytest

from servekit.core.errors import ServekitError
from servekit.serve.deployments import DefaultHistory


def test_a_corrupt_defaults_history_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "defaults.json").write_text('{"digits": ["1.0')
    with pytest.raises(ServekitError, match="defaults.json is not a servekit defaults history.*delete it"):
        DefaultHistory(tmp_path).read()
