"""The Docker scripts, run with `sh` against a fake `docker` that records its arguments (no daemon needed).

Each script runs with a PATH of its own: links to the few system tools the scripts use, plus the fakes a
test asks for, so a real `docker` or `nvidia-smi` on this machine can never take part.
"""

import os
import pty
import re
import shlex
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKER_DIR = REPO / "docker"
VENV_BIN = REPO / ".venv" / "bin"
SYSTEM_TOOLS = ("sh", "dirname", "id", "mkdir")  # what the scripts call besides docker, nvidia-smi, mlflow
ONE_GPU = "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'"


def command_dir(path: Path, fakes: dict[str, str]) -> Path:
    """A folder to be the whole PATH: the system tools, and fake commands given as ``name -> sh body``."""
    path.mkdir()
    for tool in SYSTEM_TOOLS:
        (path / tool).symlink_to(shutil.which(tool))
    for name, body in fakes.items():
        (path / name).write_text(f"#!/bin/sh\n{body}\n")
        (path / name).chmod(0o755)
    return path


def recorder(log: Path) -> str:
    """The body of a fake command that writes its arguments to ``log``, one a line."""
    return f"printf '%s\\n' \"$@\" > {shlex.quote(str(log))}"


def run_docker_script(name: str, tmp_path: Path, env=None, fakes=None, stdin=subprocess.DEVNULL) -> list[str]:
    """Run ``sh docker/<name>`` from a folder outside the repo; return the arguments it gave `docker`."""
    log = tmp_path / "docker-arguments"
    bin_dir = command_dir(tmp_path / "bin", {"docker": recorder(log), **(fakes or {})})
    result = subprocess.run([bin_dir / "sh", DOCKER_DIR / name], cwd=tmp_path, stdin=stdin,
                            env={"PATH": str(bin_dir), "HOME": str(tmp_path), **(env or {})},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


def env_sh_defaults() -> dict[str, str]:
    """The names docker/env.sh sets when nothing overrides them."""
    names = ("IMAGE_NAME", "CONTAINER_NAME", "MLFLOW_PORT")
    script = ". docker/env.sh; " + "; ".join(f'echo "${name}"' for name in names)
    output = subprocess.run(["sh", "-c", script], cwd=REPO, env={}, capture_output=True, text=True, check=True)
    return dict(zip(names, output.stdout.splitlines(), strict=True))


def option(arguments: list[str], name: str) -> list[str]:
    """Every value given to ``name`` (``--name value``) in a command line."""
    return [value for flag, value in zip(arguments, arguments[1:], strict=False) if flag == name]


# ---- docker/env.sh ----------------------------------------------------------------------------------------
def test_env_sh_names_the_image_the_container_and_the_mlflow_port():
    defaults = env_sh_defaults()
    assert defaults["IMAGE_NAME"] and defaults["CONTAINER_NAME"]
    assert defaults["MLFLOW_PORT"] == "5000"


# ---- docker/build.sh --------------------------------------------------------------------------------------
def test_build_gives_duser_the_host_uid_and_gid_and_tags_the_image_from_env_sh(tmp_path):
    arguments = run_docker_script("build.sh", tmp_path)

    assert arguments[0] == "build"
    assert option(arguments, "--build-arg") == [f"USER_UID={os.getuid()}", f"USER_GID={os.getgid()}"]
    assert option(arguments, "--tag") == [env_sh_defaults()["IMAGE_NAME"]]
    assert option(arguments, "--file") == [str(DOCKER_DIR / "Dockerfile")]
    assert arguments[-1] == str(REPO)  # the build context, wherever the script was started from


def test_build_takes_the_image_name_from_the_environment_first(tmp_path):
    arguments = run_docker_script("build.sh", tmp_path, env={"IMAGE_NAME": "someone/experiments:v2"})
    assert option(arguments, "--tag") == ["someone/experiments:v2"]


# ---- docker/run.sh ----------------------------------------------------------------------------------------
def test_run_starts_a_detached_container_with_the_repo_at_the_same_path(tmp_path):
    defaults = env_sh_defaults()
    arguments = run_docker_script("run.sh", tmp_path)

    assert arguments[0] == "run" and "--detach" in arguments
    assert option(arguments, "--name") == [defaults["CONTAINER_NAME"]]
    assert option(arguments, "--volume") == [f"{REPO}:{REPO}"]
    assert option(arguments, "--workdir") == [str(REPO)]
    assert option(arguments, "--publish") == ["127.0.0.1:5000:5000"]  # the host's loopback only
    shm_size = option(arguments, "--shm-size")
    assert len(shm_size) == 1 and re.fullmatch(r"\d+g", shm_size[0]) and int(shm_size[0][:-1]) >= 2
    assert arguments[-3:] == [defaults["IMAGE_NAME"], "sleep", "infinity"]  # keeps running
    assert "--gpus" not in arguments  # no nvidia-smi on this PATH


def test_run_asks_for_all_gpus_when_nvidia_smi_lists_one(tmp_path):
    arguments = run_docker_script("run.sh", tmp_path, fakes={"nvidia-smi": ONE_GPU})
    assert option(arguments, "--gpus") == ["all"]


def test_run_does_without_gpus_when_nvidia_smi_fails(tmp_path):
    failing = "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9"
    arguments = run_docker_script("run.sh", tmp_path, fakes={"nvidia-smi": failing})
    assert "--gpus" not in arguments


def test_run_takes_names_and_port_from_the_environment_and_serves_mlflow_for_the_host(tmp_path):
    env = {"IMAGE_NAME": "my-image", "CONTAINER_NAME": "my-box", "MLFLOW_PORT": "5055"}
    arguments = run_docker_script("run.sh", tmp_path, env=env)

    assert option(arguments, "--name") == ["my-box"]
    assert option(arguments, "--publish") == ["127.0.0.1:5055:5055"]
    assert arguments[-3] == "my-image"
    # Inside, tools/mlflow_ui.sh uses the published port and listens where Docker forwards it.
    assert {"MLFLOW_PORT=5055", "MLFLOW_HOST=0.0.0.0"} <= set(option(arguments, "--env"))


def test_run_passes_extra_options_to_docker_run(tmp_path):
    log = tmp_path / "docker-arguments"
    bin_dir = command_dir(tmp_path / "bin", {"docker": recorder(log)})
    subprocess.run([bin_dir / "sh", DOCKER_DIR / "run.sh", "--volume", "/data:/data:ro"], cwd=tmp_path,
                   env={"PATH": str(bin_dir)}, check=True, timeout=30)
    arguments = log.read_text().splitlines()

    assert option(arguments, "--volume") == [f"{REPO}:{REPO}", "/data:/data:ro"]
    assert arguments[-4:] == ["/data:/data:ro", env_sh_defaults()["IMAGE_NAME"], "sleep", "infinity"]


# ---- docker/exec.sh ---------------------------------------------------------------------------------------
def test_exec_opens_bash_as_duser_without_a_terminal_when_stdin_is_not_one(tmp_path):
    arguments = run_docker_script("exec.sh", tmp_path)
    assert arguments == ["exec", "-i", "-u", "duser", "-w", str(REPO), env_sh_defaults()["CONTAINER_NAME"], "bash"]


def test_exec_asks_for_a_terminal_when_stdin_is_one(tmp_path):
    controller, terminal = pty.openpty()
    try:
        arguments = run_docker_script("exec.sh", tmp_path, env={"CONTAINER_NAME": "my-box"}, stdin=terminal)
    finally:
        os.close(controller)
        os.close(terminal)
    assert arguments[:4] == ["exec", "-it", "-u", "duser"]
    assert arguments[-2:] == ["my-box", "bash"]


def test_exec_runs_a_given_command_instead_of_bash(tmp_path):
    log = tmp_path / "docker-arguments"
    bin_dir = command_dir(tmp_path / "bin", {"docker": recorder(log)})
    subprocess.run([bin_dir / "sh", DOCKER_DIR / "exec.sh", "nvidia-smi", "-L"], cwd=tmp_path,
                   env={"PATH": str(bin_dir)}, stdin=subprocess.DEVNULL, check=True, timeout=30)
    assert log.read_text().splitlines()[-3:] == [env_sh_defaults()["CONTAINER_NAME"], "nvidia-smi", "-L"]


# ---- docker/Dockerfile ------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined and comments left out."""
    lines = [line for line in (DOCKER_DIR / "Dockerfile").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_dockerfile_builds_on_a_python_image_and_installs_the_requirements_with_their_torch():
    instructions = dockerfile_instructions()
    image = [arguments for name, arguments in instructions if name == "FROM"]
    # Python only, the project's version: the torch of requirements.txt is the image's only torch (a PyTorch
    # base image holds another, which pip replaces at the cost of gigabytes).
    python = re.search(r'target-version = "py3(\d+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert len(image) == 1 and re.fullmatch(rf"python:3\.{python}(\.\d+)?-slim-[a-z]+", image[0]), image
    assert re.search(r"^torch==\d+\.\d+\.\d+$", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert ("ENV", "NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility") in instructions
    runs = " && ".join(arguments for name, arguments in instructions if name == "RUN")
    assert re.search(r"apt-get install [^&]*\btmux\b", runs) and re.search(r"apt-get install [^&]*\bsudo\b", runs)
    assert re.search(r"pip install [^&]*-r /tmp/requirements.txt", runs)
    assert ("COPY", "requirements.txt /tmp/requirements.txt") in instructions
    # The build context is the repository, and .dockerignore must let that one file through.
    assert (REPO / ".dockerignore").read_text().splitlines()[-1] == "!requirements.txt"


def test_dockerfile_creates_duser_with_the_host_ids_and_passwordless_sudo_and_runs_as_duser():
    instructions = dockerfile_instructions()
    assert ("ARG", "USER_UID=1000") in instructions and ("ARG", "USER_GID=1000") in instructions
    runs = " && ".join(arguments for name, arguments in instructions if name == "RUN")
    assert re.search(r'groupadd [^&]*--gid "\$USER_GID" duser', runs)
    assert re.search(r'useradd [^&]*--uid "\$USER_UID" --gid "\$USER_GID" [^&]*duser', runs)
    assert re.search(r"duser ALL=\(ALL\) NOPASSWD:ALL.*> /etc/sudoers.d/duser", runs)
    users = [arguments for name, arguments in instructions if name == "USER"]
    assert users[-1] == "duser"


# ---- linters ----------------------------------------------------------------------------------------------
def test_shell_scripts_pass_shellcheck():
    scripts = sorted(DOCKER_DIR.glob("*.sh")) + sorted((REPO / "tools").glob("*.sh"))
    assert {"build.sh", "run.sh", "exec.sh", "env.sh", "mlflow_ui.sh"} <= {script.name for script in scripts}
    for script in scripts:  # one at a time: each must pass without the others given as input
        result = subprocess.run([VENV_BIN / "shellcheck", script], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    result = subprocess.run([VENV_BIN / "hadolint", DOCKER_DIR / "Dockerfile"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
