"""Pipeline specs: the shipped ones load; every kind of bad spec is rejected with path, value and rule."""

from pathlib import Path

import pytest
import yaml

from visgen.config import PipelineSpec, SpecError, load_spec, parse_override

PIPELINES = sorted(Path("pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_shipped_specs_load(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert Path(spec.workdir).is_absolute()
    # ${workdir} placeholders are substituted everywhere
    assert "${" not in str(spec.dump())


def test_sections_are_typed_and_owned():
    from visgen.data.ingest import IngestConfig
    from visgen.data.synth import SynthConfig
    from visgen.models.vq import VQConfig
    from visgen.tracking import TrackingConfig
    from visgen.train.config import ScalingConfig, TrainConfig

    spec = load_spec("pipelines/shapes-tiny.yaml")
    assert isinstance(spec.data.synth, SynthConfig)
    assert isinstance(spec.data.ingest, IngestConfig)
    assert isinstance(spec.image_tokenizer.model, VQConfig)
    assert isinstance(spec.image_tokenizer.train, TrainConfig)
    assert isinstance(spec.image_tokenizer.scaling, ScalingConfig)
    assert isinstance(spec.tracking, TrackingConfig)
    # the image tokenizer's resolution follows the ingest stage's
    assert spec.image_tokenizer.model.resolution == spec.data.ingest.resolution
    assert spec.data.synth.output == spec.data.ingest.source == str(spec.paths.shards)


def _write(tmp_path, data) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _tiny() -> dict:
    return yaml.safe_load(Path("pipelines/shapes-tiny.yaml").read_text())


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["data"]["ingest"].update(resolutoin=32), ["data.ingest.resolutoin", "unknown key"]),
    (lambda d: d.update(extra_section={}), ["extra_section", "unknown key"]),
    (lambda d: d["data"].update(sink="x"), ["data.sink", "unknown key"]),
    (lambda d: d["data"]["ingest"].update(resolution="big"), ["data.ingest.resolution", "'big'", "integer"]),
    (lambda d: d["data"]["ingest"].update(resolution=4), ["data.ingest.resolution", "4", "greater than or equal to 8"]),
    (lambda d: d["data"]["ingest"].update(resize_mode="stretch"), ["data.ingest.resize_mode", "'stretch'", "'crop' or 'pad'"]),
    (lambda d: d["data"]["synth"].update(num_shards=0), ["data.synth.num_shards", "0"]),
    (lambda d: d["text_tokenizer"].update(vocab_size=10), ["text_tokenizer.vocab_size", "10"]),
    (lambda d: d["image_tokenizer"]["train"].update(lr=-1), ["image_tokenizer.train.lr", "-1"]),
    (lambda d: d["image_tokenizer"]["model"].update(preset="huge"), ["image_tokenizer.model.preset", "'huge'", "tiny"]),
    (lambda d: d["image_tokenizer"]["model"].update(resolution=64), ["image_tokenizer.model.resolution", "64", "data.ingest.resolution"]),
    (lambda d: d["image_tokenizer"]["scaling"].update(use_gpu="sometimes"), ["image_tokenizer.scaling.use_gpu", "'sometimes'"]),
    (lambda d: d["data"].pop("ingest"), ["data.ingest", "missing"]),
    (lambda d: d.update(name="bad name!"), ["name", "'bad name!'"]),
])
def test_bad_specs_name_field_value_and_rule(tmp_path, mutate, expected):
    data = _tiny()
    mutate(data)
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, data))
    for text in expected:
        assert text in str(err.value), (text, str(err.value))


def test_missing_spec_file_is_named(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml.*does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_invalid_yaml_and_non_mapping(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
    p.write_text("- a list\n- not a mapping\n")
    with pytest.raises(SpecError, match="mapping at the top level"):
        load_spec(p)


def test_overrides_and_workdir_env(tmp_path, monkeypatch):
    spec = load_spec("pipelines/shapes-tiny.yaml", {"data.ingest.resolution": 16, "workdir": str(tmp_path / "w")})
    assert spec.data.ingest.resolution == 16 and spec.image_tokenizer.model.resolution == 16
    assert spec.data.synth.output == str(tmp_path / "w" / "shards")
    monkeypatch.setenv("VISGEN_WORKDIR", str(tmp_path / "env"))
    assert load_spec("pipelines/shapes-tiny.yaml").workdir == str(tmp_path / "env")
    # an explicit override still wins over the environment
    assert load_spec("pipelines/shapes-tiny.yaml", {"workdir": str(tmp_path / "x")}).workdir == str(tmp_path / "x")


def test_override_into_a_scalar_is_rejected():
    with pytest.raises(SpecError, match="data.ingest.source.*cannot set"):
        load_spec("pipelines/shapes-tiny.yaml", {"data.ingest.source.x": 1})


def test_parse_override():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=hello") == ("a.b", "hello")
    with pytest.raises(SpecError, match="dotted.key=value"):
        parse_override("no-equals-sign")


def test_spec_objects_are_immutable():
    spec = load_spec("pipelines/shapes-tiny.yaml")
    with pytest.raises(Exception):
        spec.data.ingest.resolution = 8
    assert isinstance(spec, PipelineSpec)


@pytest.mark.parametrize("key, value, line", [
    ("lm.model.pooled_condition", "maybe", "lm.model.pooled_condition: 'maybe' is not allowed: Input should be a valid boolean"),
    ("lm.model.preset", "huge", "lm.model.preset: 'huge' is not allowed: choose one of"),
    ("eval.sampling_search.prompts_per_task", 0, "eval.sampling_search.prompts_per_task: 0 is not allowed"),
    ("lm.model.grid_context", "maybe", "lm.model.grid_context: 'maybe' is not allowed: Input should be a valid boolean"),
    ("lm.model.neighbour_context", "maybe", "lm.model.neighbour_context: 'maybe' is not allowed: Input should be a valid boolean"),
    ("sampling.object_temperature", -0.5, "sampling.object_temperature: -0.5 is not allowed"),
    ("sampling.object_min_p", 0.1, "sampling: {'cfg_scale': 2.0, 'top_k': 64, 'object_min_p': 0.1} is not "
     "allowed: Value error, object_min_p=0.1 bounds the object codes of object_temperature, which is null"),
    ("lm.model.grid_context_radius", 9, "lm.model.grid_context_radius: 9 is not allowed"),
    ("sampling.object_cfg_scale", 3.0, "sampling: {'cfg_scale': 2.0, 'top_k': 64, 'object_cfg_scale': 3.0} is not "
     "allowed: Value error, object_cfg_scale=3.0 guides the object codes of object_temperature, which is null"),
])
def test_a_sections_own_check_is_reported_alone_not_with_the_whole_spec(key, value, line):
    # These checks run inside the spec's composition; the message is the header and the one line
    # naming the field, without the enclosing mapping pydantic would attach to it.
    with pytest.raises(SpecError) as err:
        load_spec("pipelines/shapes-tiny.yaml", {key: value})
    head, *rest = str(err.value).splitlines()
    assert head == "invalid spec 'pipelines/shapes-tiny.yaml':"
    assert len(rest) == 1 and rest[0].startswith(line), str(err.value)
