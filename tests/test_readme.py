"""The README's promises that a test can hold it to."""


from serverproc import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()


def test_ci_runs_the_test_command_the_readme_gives():
    ci_lines = [l.strip() for l in (PROJECT_ROOT / ".ci/run").read_text().splitlines() if "pytest" in l and not l.strip().startswith("#")]
    assert ci_lines, ".ci/run runs no pytest"
    for line in ci_lines:
        assert f"`{line}`" in README


def test_readme_serves_the_sample_tree_the_project_ships():
    first_command = next(l.strip() for l in README.splitlines() if "minimal-registry -d" in l)
    directory = first_command.split("minimal-registry -d ", 1)[1].split()[0]
    assert (PROJECT_ROOT / directory / "library/hello/manifests/latest").is_symlink()


def test_readme_hosts_toml_is_what_k3s_writes():
    import clients

    block = README.split("hosts.toml <<'EOF'\n", 1)[1].split("    EOF\n", 1)[0]
    meaningful = lambda text: [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert meaningful(block) == meaningful(clients.hosts_toml_text("bootstrap-registry.airgap", "http://127.0.0.1:9080"))
