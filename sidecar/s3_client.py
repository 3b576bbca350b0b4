"""The aiobotocore session behind the S3 sink, without the data the sidecar never uses.

Creating an S3 client makes botocore load, and keep for the life of the process, the
endpoint data of every AWS service in every partition (`endpoints.json`: 6.7 MiB of
Python objects) and the S3 API model with its documentation (3.2 MiB, half of it prose).
A sidecar talks to S3, and to STS for web-identity credentials (IRSA), nothing else: its
loader keeps only those services' endpoints and empties the documentation, about 8 MiB of
a sidecar's RSS with S3 archival (README, "Performance"). Another service's client would
still work: botocore then builds its hostname from the partition's template.

Imported only once an S3 target is used, like botocore itself.
"""

from __future__ import annotations

import gzip
import os
from typing import Any

import orjson
from aiobotocore.session import AioSession, get_session
from botocore.loaders import JSONFileLoader, Loader

# The services whose endpoint data is kept.
ENDPOINT_SERVICES = frozenset({"s3", "sts"})


class SidecarFileLoader(JSONFileLoader):  # type: ignore[misc]
    """botocore's JSON file loader, with plain dicts (botocore's own makes an OrderedDict of
    every object: twice the memory), trimmed as the module says. What is kept is copied out of
    the parsed file, so the whole parse is freed at once instead of leaving holes."""

    def load_file(self, file_path: str) -> Any:
        for extension, opener in (".json", open), (".json.gz", gzip.open):
            path = file_path + extension
            if os.path.isfile(path):
                with opener(path, "rb") as file:
                    data = orjson.loads(file.read())
                return _trimmed(os.path.basename(file_path), data)
        return None


def _trimmed(name: str, data: Any) -> Any:
    if name == "endpoints":
        for partition in data.get("partitions", ()):
            services = partition.get("services", {})
            partition["services"] = {
                key: value for key, value in services.items() if key in ENDPOINT_SERVICES
            }
    elif name == "service-2":
        _empty_documentation(data)
    else:
        return data
    return orjson.loads(orjson.dumps(data))


def _empty_documentation(node: Any) -> None:
    """Empty the `documentation` prose of an API model (docstrings and `help()` only; the
    keys stay, botocore reads some of them)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "documentation" in item:
                item["documentation"] = ""
            stack.extend(value for value in item.values() if isinstance(value, dict | list))
        elif isinstance(item, list):
            stack.extend(value for value in item if isinstance(value, dict | list))


def lean_session() -> AioSession:
    """An aiobotocore session (default credential chain, AWS_ENDPOINT_URL_S3 and the other
    standard variables) whose data loader reads files with `SidecarFileLoader`."""
    session = get_session()
    data_path = session.get_config_variable("data_path")
    paths = None
    if data_path:  # as botocore.loaders.create_loader reads AWS_DATA_PATH
        paths = [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)]
    loader = Loader(extra_search_paths=paths, file_loader=SidecarFileLoader())
    session.register_component("data_loader", loader)
    return session
