"""A deployed model's config parameter (config.pbtxt `parameters`), cached per model version."""

from __future__ import annotations

from dataclasses import dataclass, field

from api.triton_port import TritonPort


@dataclass
class VersionedParameter:
    """A hot swap publishes a new version with its own value (a new classifier's threshold, a new
    LoRA's trigger words); keying by version means the value always matches the weights that
    answered, with no time-to-live to tune."""

    model: str
    key: str
    values: dict[str, str | None] = field(default_factory=dict)

    async def get(self, client: TritonPort, version: str) -> str | None:
        if version not in self.values:
            self.values[version] = await client.model_parameter(self.model, self.key, version)
        return self.values[version]
