"""`bench soak` runs, stays exact through shape changes and trace misses, and leaks no thread,
file descriptor or device byte over a short run (the long run's figures: docs/reliability.md)."""

import json

from vzstream.bench import soak


def test_soak_is_exact_and_leaks_nothing_countable(capsys):
    assert soak.main(["--passes", "60", "--warmup", "20", "--miss-every", "10", "--check-every", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
    assert row["outputs_equal"] is True and row["misses"] > 0
    assert (row["device_nbytes_growth"], row["threads_growth"], row["fds_growth"]) == (0, 0, 0)
