"""Bad specs: each is one ``SpecError`` naming the file, the right line and the field; nothing is executed.

Every case edits the valid spec ``BASE`` below (line numbers on the right), writes it to ``tmp_path`` and
runs the whole pipeline through ``optgen.load``. Injection attempts aim at a marker file in ``tmp_path``
(absolute path, so the working directory does not matter) and check that it never appears, also after
``optgen build`` and ``optgen check`` on the same file.
"""

from __future__ import annotations

import sys

import pytest
import torch

import optgen
from optgen.cli import main as cli_main
from optgen.errors import SpecError
from optgen.spec import load_spec_text

BASE = """\
name: errspec
class: ErrSpec
doc: A spec for error tests.
hyperparams:
  lr: {default: 0.1, range: "[0, inf)"}
  betas: {default: [0.9, 0.99], range: "[0, 1)"}
param: {storage: native}
grad: {storage: native}
state:
  m: {storage: fp32, init: 0}
update: |
  m = beta1*m + (1 - beta1)*g
  p = p - lr*m
"""
#  1 name / 2 class / 3 doc / 4 hyperparams / 5 lr / 6 betas / 7 param / 8 grad / 9 state / 10 m
# 11 update / 12 m = ... / 13 p = ...


def edit(replacements: dict[int, str | None] | None = None, append: str = "") -> str:
    """BASE with whole lines replaced (1-based; None deletes the line, text may hold several lines)."""
    lines = BASE.splitlines()
    for number, text in sorted((replacements or {}).items(), reverse=True):
        if text is None:
            del lines[number - 1]
        else:
            lines[number - 1 : number] = text.split("\n")
    return "\n".join(lines) + "\n" + append


def test_base_spec_is_valid(tmp_path):
    """The starting point of every case loads and runs (so each failure below is the edit's doing)."""
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    cls = optgen.load(path)
    p = torch.randn(5, requires_grad=True)
    p0 = p.detach().clone()
    g = torch.randn(5)
    p.grad = g.clone()
    cls([p], lr=0.1).step()
    torch.testing.assert_close(p.detach(), p0 - 0.1 * 0.1 * g, rtol=1e-6, atol=0)  # m = 0.1*g at step 1


# (id, spec text, line, field, fragment of the message)
CASES = [
    # malformed YAML (no field: the structure itself is broken)
    ("yaml_extra_brace", edit({5: '  lr: {default: 0.1, range: "[0, inf)"}}'}), 5, "", "malformed YAML"),
    ("yaml_bad_indent", edit({7: " param: {storage: native}"}), 7, "", "malformed YAML"),
    ("yaml_tab", edit({10: "\tm: {storage: fp32, init: 0}"}), 10, "", "malformed YAML"),
    ("yaml_colon", edit({2: "class: ErrSpec: x"}), 2, "", "malformed YAML"),
    (
        "yaml_duplicate_key",
        edit({8: "grad: {storage: native}\ngrad: {storage: native}"}),
        9,
        "grad",
        "duplicate",
    ),
    ("yaml_not_a_mapping", "- name: errspec\n- class: ErrSpec\n", 1, "", "mapping"),
    (
        "yaml_alias",
        edit({3: "doc: &text A spec.", 8: "grad: {storage: native}\nchecks: *text"}),
        9,
        "",
        "aliases",
    ),
    # missing fields
    ("missing_update", edit({11: None, 12: None, 13: None}), 1, "update", "missing required field 'update'"),
    ("missing_name", edit({1: None}), 1, "name", "missing required field 'name'"),
    ("missing_class", edit({2: None}), 1, "class", "missing required field 'class'"),
    ("missing_param", edit({7: None}), 1, "param", "missing required field 'param'"),
    ("missing_lr", edit({5: None}), 4, "hyperparams", "'lr'"),
    ("missing_default", edit({5: '  lr: {range: "[0, inf)"}'}), 5, "hyperparams.lr", "'default'"),
    ("missing_storage", edit({10: "  m: {init: 0}"}), 10, "state.m", "'storage'"),
    # misspelled fields
    ("misspelled_hyperparams", edit({4: "hyperparms:"}), 4, "hyperparms", "unknown field 'hyperparms'"),
    ("misspelled_update", edit({11: "updates: |"}), 11, "updates", "unknown field 'updates'"),
    (
        "misspelled_storage_in_state",
        edit({10: "  m: {stroage: fp32, init: 0}"}),
        10,
        "state.m.stroage",
        "unknown field 'stroage'",
    ),
    (
        "misspelled_storage_in_param",
        edit({7: "param: {stroage: native}"}),
        7,
        "param.stroage",
        "unknown field 'stroage'",
    ),
    (
        "misspelled_default",
        edit({5: '  lr: {defualt: 0.1, range: "[0, inf)"}'}),
        5,
        "hyperparams.lr.defualt",
        "unknown field 'defualt'",
    ),
    (
        "misspelled_state_field_block",
        edit({10: "  m:\n    storage: fp32\n    initial: 0"}),
        11,
        "state.m.storage",
        "initial",
    ),
    ("misspelled_check_field", edit(append="checks:\n  - requires: lr > 0\n"), 15, "checks.0", "require"),
    # wrong values
    ("bad_name", edit({1: "name: Err-Spec"}), 1, "name", "module name"),
    ("bad_class", edit({2: "class: errSpec"}), 2, "class", "CamelCase"),
    (
        "default_outside_range",
        edit({5: '  lr: {default: -0.1, range: "[0, inf)"}'}),
        5,
        "hyperparams.lr.default",
        "outside",
    ),
    ("bad_range", edit({5: '  lr: {default: 0.1, range: "0 to 1"}'}), 5, "hyperparams.lr.range", "range"),
    ("default_not_a_number", edit({5: "  lr: {default: fast}"}), 5, "hyperparams.lr.default", "number"),
    (
        "betas_names_wrong_length",
        edit({6: "  betas: {default: [0.9, 0.99], names: [b1]}"}),
        6,
        "hyperparams.betas.names",
        "names",
    ),
    ("checks_not_a_list", edit(append="checks: lr > 0\n"), 14, "checks", "list"),
    ("doc_with_control_character", edit({3: 'doc: "A \\0 spec"'}), 3, "doc", "control"),
    # storage
    (
        "unknown_storage_state",
        edit({10: "  m: {storage: fp33, init: 0}"}),
        10,
        "state.m.storage",
        "unknown storage 'fp33'",
    ),
    ("unknown_storage_param", edit({7: "param: {storage: q9}"}), 7, "param.storage", "unknown storage 'q9'"),
    (
        "storage_option_not_allowed",
        edit({10: "  m: {storage: fp32, group: 32}"}),
        10,
        "state.m.storage",
        "group",
    ),
    ("storage_not_a_name", edit({7: "param: {storage: [fp32]}"}), 7, "param.storage", "codec name"),
    # expressions
    ("unknown_symbol", edit({13: "  p = p - lr*mm"}), 13, "update", "unknown name 'mm'"),
    ("unknown_function", edit({13: "  p = p - lr*tanh(m)"}), 13, "update", "unknown function 'tanh'"),
    ("function_wrong_arity", edit({13: "  p = p - lr*sqrt(m, m)"}), 13, "update", "sqrt() takes 1"),
    ("function_keyword", edit({13: "  p = p - lr*clamp(m, lo=0, hi=1)"}), 13, "update", "positional"),
    (
        "temporary_read_before_assigned",
        edit({12: "  m = beta1*m + (1 - beta1)*u\n  u = g"}),
        12,
        "update",
        "unknown name 'u'",
    ),
    ("attribute", edit({13: "  p = p - lr*m.real"}), 13, "update", "Attribute"),
    ("lambda", edit({12: "  f = lambda x: x\n  m = beta1*m + (1 - beta1)*g"}), 12, "update", "Lambda"),
    ("list_comprehension", edit({13: "  p = p - lr*[x for x in m]"}), 13, "update", "ListComp"),
    ("generator", edit({13: "  p = p - lr*where((x for x in m), 1, 0)"}), 13, "update", "GeneratorExp"),
    ("subscript", edit({13: "  p = p - lr*m[0]"}), 13, "update", "Subscript"),
    ("string_constant", edit({13: "  p = p - lr*'m'"}), 13, "update", "numbers"),
    ("fstring", edit({13: "  p = p - lr*f'{m}'"}), 13, "update", "JoinedStr"),
    ("walrus", edit({13: "  p = p - lr*(x := m)"}), 13, "update", "NamedExpr"),
    ("augmented_assignment", edit({13: "  p -= lr*m"}), 13, "update", "assignment"),
    ("tuple_assignment", edit({13: "  p, m = m, p"}), 13, "update", "assignment"),
    (
        "chained_comparison",
        edit({13: "  p = p - lr*where(0 < m < 1, m, 0)"}),
        13,
        "update",
        "single comparisons",
    ),
    ("condition_as_value", edit({13: "  p = m > 0"}), 13, "update", "condition"),
    ("syntax_error", edit({13: "  p = p - "}), 13, "update", "syntax"),
    ("constant_overflows", edit({13: "  p = p - lr*m*1e400"}), 13, "update", "finite"),
    ("division_by_zero", edit({13: "  p = p - lr*m/(1 - 1)"}), 13, "update", "finite"),
    ("imaginary_constant", edit({13: "  p = p - lr*m*sqrt(-1)"}), 13, "update", "finite"),
    ("huge_exponent", edit({13: "  p = p - lr*m*9**9**9"}), 13, "update", "exponent"),
    (
        "bad_check",
        edit(append="checks:\n  - {require: lr > mm, message: bad}\n"),
        15,
        "checks",
        "unknown name 'mm'",
    ),
    # assignments the update may not make
    ("p_never_assigned", edit({13: "  q = p - lr*m"}), 11, "update", "'p'"),
    ("state_never_assigned", edit({12: None}), 10, "state.m", "never assigned"),
    ("assign_hyperparameter", edit({12: "  lr = 2*lr\n  m = beta1*m + (1 - beta1)*g"}), 12, "update", "'lr'"),
    ("assign_beta", edit({12: "  beta1 = 0.5\n  m = beta1*m + (1 - beta1)*g"}), 12, "update", "'beta1'"),
    ("assign_step", edit({12: "  t = t + 1\n  m = beta1*m + (1 - beta1)*g"}), 12, "update", "'t'"),
    (
        "underscore_temporary",
        edit({12: "  _x = g\n  m = beta1*m + (1 - beta1)*_x"}),
        12,
        "update",
        "reserved",
    ),
    # reserved and duplicate names
    ("state_named_p", edit({10: "  p: {storage: fp32}"}), 10, "state.p", "reserved"),
    ("state_named_g", edit({10: "  g: {storage: fp32}"}), 10, "state.g", "reserved"),
    (
        "hyperparameter_named_t",
        edit({6: "  betas: {default: [0.9, 0.99]}\n  t: {default: 1.0}"}),
        7,
        "hyperparams.t",
        "reserved",
    ),
    (
        "beta_symbol_named_p",
        edit({6: "  betas: {default: [0.9, 0.99], names: [p, q]}"}),
        6,
        "hyperparams.betas.names",
        "reserved",
    ),
    ("state_named_torch", edit({10: "  torch: {storage: fp32}"}), 10, "state.torch", "reserved"),
    (
        "hyperparameter_named_len",
        edit({6: "  betas: {default: [0.9, 0.99]}\n  len: {default: 1.0}"}),
        7,
        "hyperparams.len",
        "reserved",
    ),
    (
        "temporary_named_torch",
        edit({12: "  torch = g\n  m = beta1*m + (1 - beta1)*torch"}),
        12,
        "update",
        "reserved",
    ),
    (
        "temporary_named_param",
        edit({12: "  param = g\n  m = beta1*m + (1 - beta1)*param"}),
        12,
        "update",
        "reserved",
    ),
    (
        "temporary_named_numel_here",  # the kernel's element count, read again by grouped codecs after the update
        edit({12: "  numel_here = g\n  m = beta1*m + (1 - beta1)*numel_here"}),
        12,
        "update",
        "reserved",
    ),
    ("state_named_q8", edit({10: "  q8: {storage: fp32}"}), 10, "state.q8", "reserved"),  # a codec module
    ("state_named_like_a_keyword", edit({10: "  lambda: {storage: fp32}"}), 10, "state.lambda", "identifier"),
    (
        "state_and_hyperparameter_same_name",
        edit({6: "  betas: {default: [0.9, 0.99]}\n  m: {default: 1.0}"}),
        7,
        "hyperparams.m",
        "twice",
    ),
    # names the generated code uses: the kernel's slice loop overwrote a hyper-parameter 'k' (wrong results),
    # 'self' or a pointer table made the module fail to import, 'initial_lr' is an LR scheduler's group key
    ("hyperparameter_named_k", edit({6: "  betas: {default: [0.9, 0.99]}\n  k: {default: 1.0}"}), 7,
     "hyperparams.k", "reserved"),
    ("hyperparameter_named_self", edit({6: "  betas: {default: [0.9, 0.99]}\n  self: {default: 1.0}"}), 7,
     "hyperparams.self", "reserved"),
    ("hyperparameter_named_initial_lr", edit({6: "  betas: {default: [0.9, 0.99]}\n  initial_lr: {default: 1.0}"}),
     7, "hyperparams.initial_lr", "reserved"),
    ("temporary_named_like_a_pointer_table", edit({12: "  param_ptrs = g\n  m = beta1*m + (1 - beta1)*param_ptrs"}),
     12, "update", "buffers or functions"),
    ("temporary_named_like_a_codec_buffer", edit({10: "  m: {storage: q8_dynamic}",
                                                  12: "  state_m_absmax = g\n  m = beta1*m + (1 - beta1)*g"}),
     12, "update", "reserved"),
    ("temporary_named_like_a_generated_function", edit({12: "  errspec_step_kernel = g\n  m = beta1*m + (1 - beta1)*g"}),
     12, "update", "buffers or functions"),
    # keys of optimizer.state[p]: the step count, another buffer's key, torch names
    ("state_named_step", edit({10: "  step: {storage: fp32}", 12: "  step = beta1*step + (1 - beta1)*g",
                               13: "  p = p - lr*step"}), 10, "state.step", "the step count"),
    ("state_named_like_a_side_buffer", edit({10: "  m: {storage: q8_dynamic}\n  m_absmax: {storage: fp32}",
                                             12: "  m = beta1*m + (1 - beta1)*g\n  m_absmax = g"}),
     11, "state.m_absmax", "a buffer of 'm'"),
    ("torch_name_master", edit({10: "  m: {storage: fp32, torch_name: master}"}), 10, "state.m.torch_name", "taken"),
    ("torch_name_twice", edit({10: "  m: {storage: fp32, torch_name: exp_avg}\n  v: {storage: fp32, torch_name: exp_avg}",
                               12: "  m = beta1*m + (1 - beta1)*g\n  v = g*g"}), 11, "state.v.torch_name", "taken"),
    # class and module names the generated module would break or shadow
    ("class_None", edit({2: "class: None"}), 2, "class", "keyword or builtin"),
    ("class_builtin", edit({2: "class: Exception"}), 2, "class", "keyword or builtin"),
    ("class_named_like_an_import", edit({2: "class: Buffer"}), 2, "class", "reserved"),
    ("name_torch", edit({1: "name: torch"}), 1, "name", "shadow"),
    ("name_stdlib", edit({1: "name: random"}), 1, "name", "shadow"),
    # numbers: fp32 computes the update, and the generated code prints them as literals
    ("default_nan", edit({5: "  lr: {default: .nan}"}), 5, "hyperparams.lr.default", "finite"),
    ("default_inf", edit({5: "  lr: {default: .inf}"}), 5, "hyperparams.lr.default", "finite"),
    ("init_too_large", edit({10: "  m: {storage: fp32, init: 1.0e300}"}), 10, "state.m.init", "fp32 range"),
    ("constant_beyond_fp32", edit({13: "  p = p - 2.0**1024*m"}), 13, "update", "fp32 range"),
    ("constant_beyond_fp32_int", edit({13: "  p = p - 2**1000*m"}), 13, "update", "fp32 range"),
    ("constant_exp_beyond_fp32", edit({13: "  p = p - exp(1000)*m"}), 13, "update", "fp32 range"),
    ("nested_power_does_not_hang", edit({13: "  p = p - ((9**1024)**1024)**1024*m"}), 13, "update", "fp32 range"),
    # YAML tags that do not fit their value, and reductions in checks
    ("yaml_int_tag_on_text", edit({1: "name: !!int errspec"}), 1, "name", "not a valid int"),
    ("yaml_bool_tag_on_text", edit({5: "  lr: {default: !!bool maybe}"}), 5, "hyperparams.lr.default", "not a valid bool"),
    ("check_with_a_reduction", edit(append="checks:\n  - require: sum(lr) > 0\n"), 15, "checks", "reductions"),
]


@pytest.mark.parametrize("text, line, field, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_spec(tmp_path, text, line, field, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        optgen.load(path)
    err = info.value
    message = str(err)
    assert "\n" not in message
    assert err.file == str(path) and err.line == line, message
    assert message.startswith(f"{path}:{line}: "), message
    assert err.field == field, message
    if field:
        assert f": {field}: " in message
    assert fragment in message


# ------------------------------------------------------------------------------------ injection attempts
def _injections(marker: str) -> dict[str, str]:
    """Specs that would create ``marker`` if any part of them were executed."""
    cmd = f"touch {marker}"
    return {
        "update_import": edit({13: f"  p = __import__('os').system('{cmd}')"}),
        "update_import_in_math": edit({13: f"  p = p - lr*m*__import__('os').system('{cmd}')"}),
        "update_exec": edit({13: f"  p = p - lr*m*exec(\"open('{marker}', 'w')\")"}),
        "update_eval": edit({13: f"  p = eval(\"__import__('os').system('{cmd}')\")"}),
        "update_open": edit({13: f"  p = p - lr*m*open('{marker}', 'w')"}),
        "update_statement": edit({13: f"  import os; os.system('{cmd}')"}),
        "update_attribute_chain": edit({13: f"  p = ().__class__.__base__.__subclasses__()[0]('{cmd}')"}),
        "check_import": edit(append=f"checks:\n  - require: __import__('os').system('{cmd}') == 0\n"),
        "default_import": edit({5: f"  lr: {{default: \"__import__('os').system('{cmd}')\"}}"}),
        "range_import": edit(
            {5: f"  lr: {{default: 0.1, range: \"[0, __import__('os').system('{cmd}'))\"}}"}
        ),
        "name_code": edit({1: f"name: \"x; import os; os.system('{cmd}')\""}),
        "class_code": edit({2: f"class: \"X:\\n    import os; os.system('{cmd}')\""}),
        "storage_code": edit({10: f"  m: {{storage: \"fp32; import os; os.system('{cmd}')\"}}"}),
        "state_name_code": edit({10: f"  \"m = __import__('os').system('{cmd}')\": {{storage: fp32}}"}),
        "hyperparameter_name_code": edit({5: f"  \"lr=__import__('os').system('{cmd}')\": {{default: 0.1}}"}),
        "yaml_python_object_apply": edit({3: f'doc: !!python/object/apply:os.system ["{cmd}"]'}),
        "yaml_python_object_apply_param": edit({7: f'param: !!python/object/apply:os.system ["{cmd}"]'}),
        "yaml_python_object_new": edit({3: f'doc: !!python/object/new:os.system ["{cmd}"]'}),
        "yaml_python_name_tag": edit({7: "param: {storage: !!python/name:os.system native}"}),
        "yaml_python_tag_on_key": edit({10: "  !!python/name:os.system m: {storage: fp32}"}),
        "yaml_local_tag": edit({3: "doc: !shell touch"}),
    }


@pytest.mark.parametrize("case_id", list(_injections("MARKER")))
def test_injection_is_rejected_and_creates_no_file(tmp_path, case_id):
    marker = tmp_path / "PWNED"
    text = _injections(str(marker))[case_id]
    spec = tmp_path / f"{case_id}.yaml"
    spec.write_text(text)
    with pytest.raises(SpecError) as info:
        optgen.load(spec)
    message = str(info.value)
    assert info.value.line is not None and message.startswith(f"{spec}:{info.value.line}: "), message
    assert cli_main(["build", str(spec), "-o", str(tmp_path / "out")]) == 1
    assert cli_main(["check", str(spec)]) == 1
    assert not marker.exists(), case_id
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# Free text full of docstring terminators (Q3 = three double quotes, S3 = three single quotes),
# backslashes and code ({code} is filled in by the test).
DOC_SPEC = r"""name: docspec
class: DocSpec
doc: |
  Ends a docstring early Q3 + {code} + Q3 a backslash \ at the end \
hyperparams:
  lr:
    default: 0.1
    range: "[0, inf)"
    doc: |
      lr S3 Q3; {code}; Q3
param: {storage: native}
state:
  m: {storage: fp32}
checks:
  - require: lr >= 0
    message: |
      Q3 {code} S3 \
update: |
  m = 0.1*g + 0.9*m  # Q3; {code}; Q3
  p = p - lr*m
""".replace("Q3", '"' * 3).replace("S3", "'" * 3)


def test_doc_with_quotes_and_code_is_inert(tmp_path):
    """Free text (doc, hyper-parameter doc, check message, update comments) with docstring-breaking
    quotes and backslashes is kept as text: the module imports, nothing runs, the text is verbatim."""
    marker = tmp_path / "PWNED"
    code = f"__import__('os').system('touch {marker}')"
    text = DOC_SPEC.replace("{code}", code)
    spec = tmp_path / "docspec.yaml"
    spec.write_text(text)
    loaded = load_spec_text(text, str(spec))
    assert '"""' in loaded.doc and code in loaded.doc and loaded.doc.endswith("\\\n")
    cls = optgen.load(spec)
    assert not marker.exists()
    assert '"""' in cls.__doc__ and code in cls.__doc__ and "a backslash \\ at the end \\" in cls.__doc__
    module_doc = sys.modules[cls.__module__].__doc__
    assert f'# """; {code}; """' in module_doc  # the update's comment, as text
    assert cli_main(["build", str(spec), "-o", str(tmp_path / "out")]) == 0
    source = (tmp_path / "out" / "docspec.py").read_text()
    compile(source, "docspec.py", "exec")
    assert not marker.exists()
    # the class works: m = 0.1*g at step 1, p = p - lr*m
    p = torch.randn(4, requires_grad=True)
    p0, g = p.detach().clone(), torch.randn(4)
    p.grad = g.clone()
    cls([p], lr=0.2).step()
    torch.testing.assert_close(p.detach(), p0 - 0.2 * (0.1 * g), rtol=1e-6, atol=0)
    with pytest.raises(ValueError) as info:
        cls([torch.randn(2, requires_grad=True)], lr=-1.0)  # range check first
    assert "lr" in str(info.value)
    assert not marker.exists()


def test_spec_file_name_cannot_inject_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED_BY_FILENAME"
    text = edit({1: "name: fname", 2: "class: FName", 3: None})  # no doc: the docstring names the file
    spec = tmp_path / 'x"""; __import__("os").system("touch PWNED_BY_FILENAME"); """.yaml'
    spec.write_text(text)
    try:
        optgen.load(spec)
    except (SpecError, SyntaxError):
        pass  # refusing such a file name would be fine too
    assert not marker.exists()


def test_yaml_text_is_not_parsed_twice():
    """A plain multi-line scalar whose text looks like YAML document markers stays text (no raw YAML
    error: scalars are built from the parsed node, never by parsing their text again)."""
    text = edit({3: "doc: first line\n\n  --- !!python/object/apply:os.system ['true']"})
    spec = load_spec_text(text, "doc.yaml")
    assert spec.doc == "first line\n--- !!python/object/apply:os.system ['true']"
