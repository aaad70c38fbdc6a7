import pytest

from qlora.config import ConfigError, TrainConfig, build_config, field_docs, load_yaml, parse_size


def test_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.lr, c.lora_r, c.lora_alpha, c.lora_dropout, c.max_grad_norm, c.weight_decay) == (2e-4, 64, 16.0, 0.05,
                                                                                               0.3, 0.0)
    assert (c.quant_type, c.double_quant, c.blocksize, c.optimizer, c.lr_scheduler) == ("nf4", True, 64, "paged_adamw",
                                                                                        "constant")
    assert c.warmup_ratio == 0.03 and c.lora_targets == "all"
    assert c.lora_dtype == "float32"  # qlora's default; the paper's code casts LoRA to bf16 (--lora-dtype bfloat16)


def test_every_field_has_a_docstring():
    docs = field_docs()
    assert set(docs) == set(TrainConfig.__dataclass_fields__)
    assert all(docs.values())


def test_coercion_from_strings():
    c = build_config({"lr": "1e-3", "max-steps": "7", "double_quant": "false", "resume": "none"})
    assert c.lr == 1e-3 and c.max_steps == 7 and c.double_quant is False and c.resume is None



def test_bf16_is_a_quant_type_and_an_alias_of_the_bfloat16_dtype():
    # quant_type bf16 (no quantization) was respelled to bfloat16 and refused; dtypes still take the alias
    c = build_config({"quant_type": "bf16", "compute_dtype": "bf16", "lora_dtype": "bf16"})
    assert (c.quant_type, c.compute_dtype, c.lora_dtype) == ("bf16", "bfloat16", "bfloat16")
    with pytest.raises(ConfigError, match="quant_type: 'bfloat16' is not one of"):
        build_config({"quant_type": "bfloat16"})

@pytest.mark.parametrize("values, match", [
    ({"lora_rank": 8}, "unknown key 'lora_rank' \\(did you mean 'lora_r'\\?\\)"),
    ({"max_steps": "ten"}, "max_steps: expected an integer"),
    ({"max_steps": 0}, "max_steps must be > 0"),
    ({"batch_size": -1}, "batch_size must be > 0"),
    ({"lr": 0}, "lr must be > 0"),
    ({"quant_type": "nf3"}, "quant_type: 'nf3' is not one of"),
    ({"lora_dtype": "float16"}, "lora_dtype: 'float16' is not one of float32, bfloat16"),
    ({"blocksize": 100}, "blocksize must be a power of two"),
    ({"double_quant": "maybe"}, "double_quant: expected true/false"),
    ({"lora_dropout": 1.5}, "lora_dropout must be in"),
    ({"optimizer_memory_budget": "lots"}, "optimizer_memory_budget: cannot read 'lots' as a size"),
    ({"max_steps": 2.5}, "max_steps: expected an integer"),
    ({"max_steps": True}, "max_steps: expected a number"),
])
def test_bad_values_name_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(values, source="cfg.yaml")


def test_parse_size():
    assert parse_size("512MB") == 512_000_000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("1000") == 1000


def test_yaml_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-3\nmax_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_yaml(str(p))
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(str(p))
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(str(tmp_path / "missing.yaml"))
    p.write_text("lr: 0.001\nlora_r: 8\n")
    assert build_config(load_yaml(str(p))).lora_r == 8
