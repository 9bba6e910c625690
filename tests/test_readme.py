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


def readme_commands():
    """The README's shell lines: indented code lines, as a reader copies them."""
    return [line.strip() for line in README.splitlines() if line.startswith("    ") and line.strip()]


def test_readme_commands_work_as_root_without_sudo():
    # A fresh Debian 12 used as root has no sudo: "sudo: command not found" on the very first
    # line. `$(command -v sudo)` is sudo where it is installed and nothing where it is not.
    bare = [line for line in readme_commands()
            if line.startswith("sudo ") or " sudo " in line.replace("$(command -v sudo)", "")]
    assert not bare


def test_readme_first_two_commands_are_the_serve_and_the_ci_commands():
    commands = [line for line in readme_commands() if not line.startswith("#")][:2]
    assert "apt-get install -y python3-venv" in commands[0] and "minimal-registry -d" in commands[0]
    assert commands[1].endswith("bash .ci/run")

