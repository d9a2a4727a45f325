"""compose/: without Docker, check what would break a `docker compose up`: every service's
command is a real `splitserve` subcommand whose flags parse and validate (`--check-config`),
the addresses agree between services, and health checks point at real endpoints."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import re
import tomllib

import pytest
import yaml

from splitserve.entrypoints import cli, healthcheck

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$\$")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${X:-default}, ${X}, and $$ for a literal $."""
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            return env.get(m.group(1)) or (m.group(2) or "")

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    doc = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return interpolate(doc["services"], {})


def splitserve_services(services) -> dict[str, dict]:
    return {n: s for n, s in services.items() if str(s.get("image", "")).startswith("splitserve")}


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def check_config(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main([*argv, "--check-config"]) == 0, argv
    return json.loads(out.getvalue())


def test_every_command_is_a_subcommand_whose_flags_parse(services):
    ours = splitserve_services(services)
    assert {"tokenizer", "scheduler", "gateway", "worker", "worker-gpu"} <= set(ours)
    kinds = set()
    for name, svc in ours.items():
        if "entrypoint" in svc:
            continue  # model-init: checked below
        command = svc["command"]
        kinds.add(command[0])
        configs = check_config(command)
        assert list(configs) == [command[0]], name
        # Traces go to the collector from every service.
        assert configs[command[0]]["otlp_traces_endpoint"] == "http://otel-collector:4317"
    assert kinds == {"tokenizer", "scheduler", "worker", "gateway"}


def test_model_init_builds_the_demo_model_the_services_use(services):
    init = services["model-init"]
    script = init["entrypoint"][-1]
    assert "demo_model_path()" in script
    from splitserve.testing.demo_model import DEMO_DIR, demo_model_path  # noqa: F401  (it runs this)

    # The services default to the folder demo_model_path() builds in the cache volume.
    default = f"/root/.cache/splitserve/{DEMO_DIR}"
    assert (
        services["tokenizer"]["command"][services["tokenizer"]["command"].index("--tokenizer") + 1]
        == default
    )
    for name in ("worker", "worker-gpu"):
        assert services[name]["command"][1] == default
        assert services[name]["depends_on"]["model-init"]["condition"] == (
            "service_completed_successfully"
        )
    assert any(v.endswith(":/root/.cache/splitserve") for v in init["volumes"])


def test_addresses_agree(services):
    listen = {
        name: split_address(flag(services[name]["command"], "--address"))[1]
        for name in ("tokenizer", "scheduler", "worker", "worker-gpu")
    }
    gw = services["gateway"]["command"]
    assert split_address(flag(gw, "--scheduler-address")) == ("scheduler", listen["scheduler"])
    assert split_address(flag(gw, "--tokenizer-address")) == ("tokenizer", listen["tokenizer"])
    gw_port = int(flag(gw, "--port"))
    assert flag(gw, "--host") == "0.0.0.0"
    assert [p.split(":")[-1] for p in services["gateway"]["ports"]] == [str(gw_port)]
    # Whichever worker profile runs answers to the name the scheduler dials.
    workers = flag(services["scheduler"]["command"], "--worker-addresses").split(",")
    for address in workers:
        host, port = split_address(address)
        for name in ("worker", "worker-gpu"):
            assert host in services[name]["networks"]["default"]["aliases"], name
            assert port == listen[name]
    assert services["worker"]["profiles"] == ["cpu"] and services["worker-gpu"]["profiles"] == [
        "gpu"
    ]
    env = (COMPOSE / ".env").read_text()
    assert re.search(r"^COMPOSE_PROFILES=cpu$", env, re.M), "plain `up` must start a worker"
    # Internal services listen on all interfaces inside their container.
    for name in listen:
        assert flag(services[name]["command"], "--address").startswith("0.0.0.0:")


def test_traces_reach_jaeger(services):
    collector = yaml.safe_load((COMPOSE / "otel-collector.yaml").read_text())
    grpc_port = split_address(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1]
    for name, svc in splitserve_services(services).items():
        if "command" in svc:
            url = flag(svc["command"], "--otlp-traces-endpoint")
            assert url == f"http://otel-collector:{grpc_port}", name
            assert svc["environment"]["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "grpc"
    assert f"{grpc_port}:{grpc_port}" in services["otel-collector"]["ports"]
    mounted = services["otel-collector"]["volumes"][0].split(":")
    assert (COMPOSE / mounted[0]).resolve() == COMPOSE / "otel-collector.yaml"
    assert services["otel-collector"]["command"] == [f"--config={mounted[1]}"]
    exporter = collector["exporters"]["otlp/jaeger"]["endpoint"]
    assert split_address(exporter) == ("jaeger", 4317)
    assert collector["service"]["pipelines"]["traces"]["exporters"][0] == "otlp/jaeger"
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_health_checks_point_at_real_endpoints(services):
    from splitserve.gateway.app import _KNOWN_PATHS

    parser = healthcheck.build_parser()
    for name, svc in splitserve_services(services).items():
        if name == "model-init":
            continue
        test = svc["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "splitserve.entrypoints.healthcheck"], name
        args = parser.parse_args(test[4:])
        if name == "gateway":
            assert args.kind == "http"
            port = int(flag(svc["command"], "--port"))
            assert args.target == f"http://127.0.0.1:{port}/health"
            assert "/health" in _KNOWN_PATHS
        else:
            assert args.kind == "grpc"
            own = split_address(flag(svc["command"], "--address"))[1]
            assert args.target == f"127.0.0.1:{own}", name
        # The gateway starts only once what it calls is healthy.
    for dep in ("scheduler", "tokenizer"):
        assert services["gateway"]["depends_on"][dep]["condition"] == "service_healthy"


def test_healthcheck_module_against_a_real_health_service():
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert healthcheck.main(["--timeout", "5", "grpc", target]) == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.main(["--timeout", "5", "grpc", target]) == 0
    finally:
        server.stop(0)
    assert healthcheck.main(["--timeout", "2", "grpc", target]) == 1  # gone


def test_dockerfile_builds_cpu_and_cuda_and_installs_every_package(services):
    text = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^\s+cpu\)", text, re.M) and re.search(r"^\s+cuda\)", text, re.M)
    assert re.search(r'^ENTRYPOINT \["splitserve"\]$', text, re.M)
    copied = set(re.findall(r"^COPY (\S+) ", text, re.M))
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in dirs.values():
        assert folder.split("/")[0] in copied, f"{folder} is not copied into the image"
    builds = {s["build"]["args"]["VARIANT"] for s in splitserve_services(services).values()}
    assert builds == {"cpu", "cuda"}
    assert services["worker-gpu"]["image"] == "splitserve:cuda"
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert (
        gpu["capabilities"] == ["gpu"]
        and flag(services["worker-gpu"]["command"], "--device") == "cuda"
    )


def test_check_config_on_every_subcommand_validates_and_starts_nothing(capsys):
    out = check_config(
        ["serve", "--otlp-traces-endpoint", "http://c:4317", "--max-model-len", "64"]
    )
    assert set(out) == {"gateway", "scheduler", "worker", "tokenizer"}
    assert {c["otlp_traces_endpoint"] for c in out.values()} == {"http://c:4317"}
    assert out["scheduler"]["max_model_len"] == out["worker"]["max_model_len"] == 64
    # Comma-separated worker addresses (one value from an environment variable) split.
    sched = check_config(["scheduler", "--worker-addresses", "a:1,b:2"])["scheduler"]
    assert sched["worker_addresses"] == ["a:1", "b:2"]
    # A bad value is an error naming it, not a start-up.
    assert cli.main(["scheduler", "--block-size", "3", "--check-config"]) == 2
    assert "block_size" in capsys.readouterr().err
    assert cli.main(["worker", "m", "--collect-detailed-traces", "all", "--check-config"]) == 2
    assert "otlp_traces_endpoint" in capsys.readouterr().err
    assert cli.main(["gateway", "--api-key", "sekrit", "--check-config"]) == 0
    assert "sekrit" not in capsys.readouterr().out


def test_the_image_runs_every_service_without_sources_on_sys_path():
    # The model-init `python -c` and the health checks' `python -m` would otherwise put the
    # working folder first on sys.path: with the sources' kernels/ there, transformers'
    # `import kernels` would find it instead of Hugging Face's package.
    lines = [
        line.strip()
        for line in (COMPOSE / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert "PYTHONSAFEPATH=1" in " ".join(line for line in lines if line.startswith(("ENV", "PY")))
    workdirs = [line.split()[1] for line in lines if line.startswith("WORKDIR")]
    copied_to = workdirs[0]
    assert any(f"rm -rf {copied_to}" in line for line in lines), "sources left in the image"
    assert workdirs[-1] != copied_to and not workdirs[-1].startswith(copied_to + "/")
    assert any("-c constraints.txt" in line for line in lines)


def merge_compose(base, override):
    """Compose's merge of an override file onto a base: mappings merge, sequences append, and
    command / entrypoint / healthcheck test are replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if key in ("command", "entrypoint", "test") or key not in base:
                merged[key] = value
            else:
                merged[key] = merge_compose(base[key], value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


@pytest.fixture(scope="module")
def tp2_services() -> dict[str, dict]:
    base = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    override = yaml.safe_load((COMPOSE / "docker-compose.tp2.yml").read_text())
    return interpolate(merge_compose(base, override)["services"], {})


def _gpu_ids(service: dict) -> set[str]:
    """The GPUs one container is given: `device_ids`, or the first `count` devices (Docker
    hands out devices 0..count-1, it does not share them out between containers)."""
    ids: set[str] = set()
    for device in service["deploy"]["resources"]["reservations"]["devices"]:
        assert device["capabilities"] == ["gpu"]
        assert ("count" in device) != ("device_ids" in device), "one of count / device_ids"
        ids |= set(device.get("device_ids") or map(str, range(int(device["count"]))))
    return ids


def _without_tp_flags(command: list[str]) -> list[str]:
    out, skip = [], False
    for arg in command:
        if skip or arg in ("--tensor-parallel-size", "--tp-rank", "--distributed-init-method"):
            skip = not skip
            continue
        out.append(arg)
    return out


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_tp2_override_runs_one_stage_over_two_ranks(services, tp2_services, profile):
    workers = {
        name: svc
        for name, svc in tp2_services.items()
        if profile in svc.get("profiles", []) and svc["command"][0] == "worker"
    }
    # Each command through splitserve's own parser and WorkerConfig (--check-config).
    configs = {name: check_config(svc["command"])["worker"] for name, svc in workers.items()}
    cells = sorted((c["rank"], c["tp_rank"]) for c in configs.values())
    assert cells == [(0, 0), (0, 1)], configs  # every rank once
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "distributed_init_method"):
        assert len({c[key] for c in configs.values()}) == 1, key
    # Apart from the rank, both run the same configuration (model, KV memory, dtype, traces).
    same = [{k: v for k, v in c.items() if k != "tp_rank"} for c in configs.values()]
    assert same[0] == same[1]
    some = next(iter(configs.values()))
    assert (some["tensor_parallel_size"], some["pipeline_parallel_size"]) == (2, 1)
    driver = next(n for n, c in configs.items() if c["tp_rank"] == 0)
    (peer,) = set(workers) - {driver}
    # The rendezvous is the driver's (global rank 0 hosts the store).
    host, _ = split_address(some["distributed_init_method"].removeprefix("tcp://"))
    assert host in workers[driver]["networks"]["default"]["aliases"]
    assert "networks" not in workers[peer]
    # The scheduler dials the driver only.
    dialled = flag(tp2_services["scheduler"]["command"], "--worker-addresses").split(",")
    assert [split_address(a) for a in dialled] == [
        (host, split_address(configs[driver]["address"])[1])
    ]
    # The override restates the main file's worker command, plus the tensor-parallel flags.
    assert _without_tp_flags(workers[driver]["command"]) == services[driver]["command"]
    # The peer is built like the driver and checks its own health port.
    for key in ("image", "build", "volumes", "environment", "restart", "depends_on"):
        assert workers[peer][key] == workers[driver][key], key
    test = workers[peer]["healthcheck"]["test"]
    assert test[-1] == f"127.0.0.1:{split_address(configs[peer]['address'])[1]}"
    devices = {c["device"] for c in configs.values()}
    if profile == "gpu":
        assert devices == {"cuda"}
        ids = [_gpu_ids(workers[n]) for n in (driver, peer)]
        assert all(len(i) == 1 for i in ids) and not ids[0] & ids[1], ids  # a GPU each
    else:
        assert devices != {"cuda"} and all("deploy" not in w for w in workers.values())
