"""The README's examples of the JSON files smsrepl reads are accepted by the parsers that read them."""
import json
import pathlib
import re

from smsrepl.files.rules import PathRules, parse_configuration_body
from smsrepl.throttle import SpeedSchedule

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _json_examples() -> list[str]:
    return re.findall(r"```json\n(.*?)```", README.read_text(), re.S)


def test_every_speed_limit_and_config_example_parses():
    kinds = []
    for text in _json_examples():
        if '"speed_limit"' in text:
            schedule = SpeedSchedule.from_json(json.loads(text))
            assert schedule.rules
            kinds.append("speed_limit")
        elif '"configurations"' in text:
            rules = PathRules.from_configurations(parse_configuration_body(text.encode(), "README"), source="README")
            assert rules.given
            kinds.append("configurations")
    assert {"speed_limit", "configurations"} <= set(kinds), kinds
