"""The one configuration model: what the CLI, corral.toml and the reference in docs/configuration.md are made from.

One module per job, each importing only modules listed above it:
    model       the knobs: the dataclasses, their bounds, reading the fields back
    derived     values computed from a config: workers, ports, hosts, knobs written as strings
    capacity    file descriptors: the connection budget and the scaling ceiling
    sources     an app's plumber or Shiny files, and the near miss for a missing path
    validation  every check and its message
    loading     corral.toml -> Config
    reference   knobs' bounds for people, and the table in docs/configuration.md
    envfile     dotenv files (stands alone)
The rest of corral imports from here, not from the modules.
"""

from .capacity import (
    FD_RESERVE,
    connection_budget,
    reserved_fds,
    worker_ceiling,
)
from .derived import (
    autoscaled,
    connect_host,
    default_base_port,
    effective_workers,
    first_port,
    normalize_route,
    parse_crash_limit,
    parse_health,
    parse_upstream,
    port_span,
    scales_to_zero,
    sticky_mode,
    worker_ports,
)
from .loading import (
    build_section,
    load_toml,
    type_word,
)
from .model import (
    DAY,
    MONTH,
    WORKERS_MAX,
    AppConfig,
    Config,
    ConfigError,
    GiB,
    KiB,
    MiB,
    ServerConfig,
    base_type,
    fields_of,
    knob,
    option_name,
    plain_number,
)
from .reference import (
    REFERENCE_BEGIN,
    REFERENCE_END,
    range_text,
    reference_markdown,
    unit_text,
    update_reference,
)
from .sources import (
    SERVER_YML,
    near_file,
    resolve_plumber,
    resolve_shiny,
)
from .validation import (
    least_workers,
    range_problem,
    supervise_only_problems,
    validate,
)

__all__ = [
    "DAY",
    "FD_RESERVE",
    "MONTH",
    "REFERENCE_BEGIN",
    "REFERENCE_END",
    "SERVER_YML",
    "WORKERS_MAX",
    "AppConfig",
    "Config",
    "ConfigError",
    "GiB",
    "KiB",
    "MiB",
    "ServerConfig",
    "autoscaled",
    "base_type",
    "build_section",
    "connect_host",
    "connection_budget",
    "default_base_port",
    "effective_workers",
    "fields_of",
    "first_port",
    "knob",
    "least_workers",
    "load_toml",
    "near_file",
    "normalize_route",
    "option_name",
    "parse_crash_limit",
    "parse_health",
    "parse_upstream",
    "plain_number",
    "port_span",
    "range_problem",
    "range_text",
    "reference_markdown",
    "reserved_fds",
    "resolve_plumber",
    "resolve_shiny",
    "scales_to_zero",
    "sticky_mode",
    "supervise_only_problems",
    "type_word",
    "unit_text",
    "update_reference",
    "validate",
    "worker_ceiling",
    "worker_ports",
]
