"""The auto-backend fallback warning as a user sees it: run a script in a fresh process (no GPU,
no TRITON_INTERPRET) and read its stderr."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""\
    import torch
    from diffattn import DiffMultiheadAttention, diff_attention

    attn = DiffMultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 5, 32)
    for _ in range(3):
        y, _ = attn(x)
    q, k, v = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 2, 16)
    out = diff_attention(q, k, v, lambda_=0.5)
    print(attn.last_backend)
""")


def run_user_script(tmp_path, source: str) -> subprocess.CompletedProcess:
    script = tmp_path / "user_script.py"
    script.write_text(source)
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRITON_INTERPRET", "PYTHONWARNINGS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_fallback_warning_printed_once_at_the_users_line(tmp_path):
    result = run_user_script(tmp_path, SCRIPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"
    lines = result.stderr.splitlines()
    warning_lines = [line for line in lines if "BackendFallbackWarning" in line]
    assert len(warning_lines) == 1, result.stderr
    location, message = warning_lines[0].split(": BackendFallbackWarning: ")
    assert location == f"{tmp_path / 'user_script.py'}:7"
    assert message.startswith("diffattn: using the torch backend because the fused kernels "
                              "need a CUDA device")
    # The only other line is the user's own call, never a line of diffattn's or torch's source.
    assert lines == [warning_lines[0], "  y, _ = attn(x)"], result.stderr


def test_fallback_warning_can_be_filtered_by_category(tmp_path):
    source = ("import warnings\nimport diffattn\n"
              "warnings.simplefilter('ignore', diffattn.BackendFallbackWarning)\n" + SCRIPT)
    result = run_user_script(tmp_path, source)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_fallback_warning_under_a_diffattn_command_line_has_no_source_line(tmp_path):
    from PIL import Image

    from diffattn.models import create_model, save_pretrained
    save_pretrained(create_model("DiffCLIP-Tiny", backend="torch"), tmp_path / "tiny.safetensors")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "images" / "red.png")
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRITON_INTERPRET", "PYTHONWARNINGS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        [sys.executable, "-m", "diffattn.models.zero_shot", "--pretrained", "tiny.safetensors",
         "--images", "images", "--classes", "cat,dog"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("zero_shot.py:0: BackendFallbackWarning: diffattn: using the "
                               "torch backend because")
