"""The log4j2 configuration servekit starts TorchServe with (`torchserve --log-config`).

TorchServe 0.12's own (inside its jar) logs `org.pytorch.serve` at DEBUG, and every named logger also writes to the
root's appenders: a request left ~10 lines (its access line in three files, "Waiting time", "Sending response" and
"Backend response time" in ts_log.log twice and in stdout once), and stdout (`logs/torchserve.out`, which nothing
rolls) grew ~0.56 KB a request: ~4 GB an hour at 2,000 req/s, measured
(docs/measurements/2026-12-05-lone-request.md, section 3). This one keeps every file and what each holds once:
- access_log.log: one line a request (ACCESS_LOG), rolled like the others (100 MB, 5 kept, and each day);
- ts_log.log: the frontend at INFO (workers starting, stopping, failing; models registered; two lines a batch),
  but BatchAggregator's line a request ("Sending response for jobId") only from WARN;
- model_log.log, model_metrics.log, ts_metrics.log: the workers' output and the metrics, as TorchServe writes them;
- stdout (torchserve.out): warnings and errors only (the frontend's also in ts_log.log).
The workers' metric lines still reach the metrics endpoint: the frontend parses them before it logs them.
"""

from __future__ import annotations

from pathlib import Path

LOG_CONFIG_FILE = "log4j2.xml"


def rolling(name: str, folder: str, pattern: str) -> str:
    return f"""    <RollingFile name="{name}" fileName="${{env:{folder}:-logs}}/{name}.log"
                 filePattern="${{env:{folder}:-logs}}/{name}.%d{{dd-MMM}}.log.gz">
      <PatternLayout pattern="{pattern}"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/><TimeBasedTriggeringPolicy/></Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>"""


def logger(name: str, level: str, appender: str) -> str:
    return f'    <Logger name="{name}" level="{level}" additivity="false"><AppenderRef ref="{appender}"/></Logger>'


DETAILED = "%d{ISO8601} [%-5p] %t %c - %m%n"
PLAIN = "%d{ISO8601} - %m%n"

LOG4J2_XML = "\n".join(
    [
        '<?xml version="1.0" encoding="UTF-8"?>',
        "<!-- written by servekit (servekit/serve/torchserve_logging.py) at each `servekit serve start` -->",
        "<Configuration>",
        "  <Appenders>",
        '    <Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="' + DETAILED + '"/></Console>',
        rolling("access_log", "LOG_LOCATION", PLAIN),
        rolling("model_log", "LOG_LOCATION", DETAILED),
        rolling("ts_log", "LOG_LOCATION", DETAILED),
        rolling("model_metrics", "METRICS_LOCATION", PLAIN),
        rolling("ts_metrics", "METRICS_LOCATION", PLAIN),
        "  </Appenders>",
        "  <Loggers>",
        logger("ACCESS_LOG", "info", "access_log"),
        logger("MODEL_LOG", "all", "model_log"),
        logger("MODEL_METRICS", "all", "model_metrics"),
        logger("TS_METRICS", "all", "ts_metrics"),
        '    <Logger name="org.pytorch.serve" level="info" additivity="false">',
        '      <AppenderRef ref="ts_log"/><AppenderRef ref="STDOUT" level="warn"/>',
        "    </Logger>",
        '    <Logger name="org.pytorch.serve.wlm.BatchAggregator" level="warn"/>',  # "Sending response" a request
        '    <Logger name="io.netty" level="error"/>',
        '    <Logger name="org.apache" level="off"/>',
        '    <Root level="warn"><AppenderRef ref="STDOUT"/><AppenderRef ref="ts_log"/></Root>',
        "  </Loggers>",
        "</Configuration>",
        "",
    ]
)


def write_log_config(workdir: Path) -> Path:
    """servekit's log4j2 configuration in `workdir`, for `torchserve --log-config`."""
    path = workdir / LOG_CONFIG_FILE
    path.write_text(LOG4J2_XML)
    return path
