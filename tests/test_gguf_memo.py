"""gguf_memo.shared: one GGUFReader per file inside the block, gguf's own class outside."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from qlora import gguf_memo  # noqa: E402


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("output.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_one_reader_per_file_inside_and_gguf_restored_after(gguf_file, tmp_path):
    original = gguf.GGUFReader
    with gguf_memo.shared():
        first = gguf.GGUFReader(str(gguf_file))
        with gguf_memo.shared():  # nested: still shared, and the inner exit restores nothing
            assert gguf.GGUFReader(str(gguf_file)) is first
        assert gguf.GGUFReader(str(tmp_path / ".." / tmp_path.name / "tiny.gguf")) is first  # same file, other path
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert int(first.fields["llama.block_count"].contents()) == 2
        np.testing.assert_array_equal(first.tensors[0].data, np.arange(8, dtype=np.float32).reshape(2, 4))
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(str(gguf_file)) is not gguf.GGUFReader(str(gguf_file))


def test_a_changed_file_is_read_again(gguf_file):
    with gguf_memo.shared():
        first = gguf.GGUFReader(str(gguf_file))
        gguf_file.write_bytes(gguf_file.read_bytes() + b"\0" * 32)  # other size: another file now
        assert gguf.GGUFReader(str(gguf_file)) is not first


def test_restored_when_the_block_raises(gguf_file):
    original = gguf.GGUFReader
    with pytest.raises(RuntimeError), gguf_memo.shared():
        raise RuntimeError("load failed")
    assert gguf.GGUFReader is original
