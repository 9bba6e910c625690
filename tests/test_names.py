"""Image references read the way docker and containerd read them: the one parser the scripts ask
(`names.describe`, printed by `minimal-registry normalize`)."""

import pytest

from minimal_registry.content import names
from minimal_registry.fatal import Fatal

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, fields", [
    ("busybox", "docker.io library/busybox latest"),
    ("busybox:1.36", "docker.io library/busybox 1.36"),
    ("docker.io/library/busybox", "docker.io library/busybox latest"),
    ("docker.io/busybox", "docker.io library/busybox latest"),
    ("index.docker.io/rancher/mirrored-pause:3.6", "docker.io rancher/mirrored-pause 3.6"),
    ("rancher/mirrored-pause:3.6", "docker.io rancher/mirrored-pause 3.6"),
    ("localhost:5000/x", "localhost:5000 x latest"),
    ("localhost/x:1", "localhost x 1"),
    ("registry.local:5000/team/app:2.1", "registry.local:5000 team/app 2.1"),
    ("127.0.0.1:5000/x:v1", "127.0.0.1:5000 x v1"),
    (f"x@{DIGEST}", "docker.io library/x latest"),
    (f"registry.local:5000/x:1.0@{DIGEST}", "registry.local:5000 x 1.0"),
])
def test_a_reference_is_described_as_docker_reads_it(text, fields):
    assert names.describe(text) == fields


@pytest.mark.parametrize("text", ["Upper/Case", "x:bad:tag", "x:", "-x", "bad_host:5000x/y", "a/blobs/b", ""])
def test_a_reference_that_is_not_one_is_refused_naming_it(text):
    with pytest.raises(ValueError):
        names.describe(text)


def test_run_prints_one_line_per_reference_or_refuses_them_all(capsys):
    assert names.run(["busybox", "localhost:5000/x:1"]) == 0
    assert capsys.readouterr().out == "docker.io library/busybox latest\nlocalhost:5000 x 1\n"
    with pytest.raises(Fatal) as refused:
        names.run(["busybox", "Upper/Case"])
    assert "Upper/Case" in str(refused.value)
    assert capsys.readouterr().out == ""
