//! PyTorch zip checkpoints beyond what the fixtures exercise: views with storage offsets
//! and strides, shared storages, OrderedDict state dicts with `_metadata`, parameters,
//! protocol-4 opcodes, zip64 archives, and the format errors.

mod common;

use common::{
    expect_err, f32_bytes, fixture, read_zip, row_major, state_dict_pickle, write_torch_zip, write_zip, Pickle, Spec,
    TempDir, ZipOptions,
};
use std::borrow::Cow;
use vicuna_weights::{Checkpoint, DType};

fn storage_0_to(n: usize) -> Vec<u8> {
    f32_bytes((0..n).map(|i| i as f32))
}

#[test]
fn views_with_offsets_strides_and_shared_storage() {
    let dir = TempDir::new("views");
    let pickle = state_dict_pickle(&[
        // Plain: elements 0..6 as [2, 3].
        Spec { name: "plain", class: "FloatStorage", key: "0", numel: 24, offset: 0, shape: &[2, 3], stride: &[3, 1] },
        // Contiguous at an offset into the same storage: elements 6..12.
        Spec { name: "offset", class: "FloatStorage", key: "0", numel: 24, offset: 6, shape: &[2, 3], stride: &[3, 1] },
        // A transpose: [3, 2] view of elements 12..18 laid out [2, 3].
        Spec {
            name: "transposed",
            class: "FloatStorage",
            key: "0",
            numel: 24,
            offset: 12,
            shape: &[3, 2],
            stride: &[1, 3],
        },
        // Every other row of a [4, 2] block at 16: rows 0 and 2.
        Spec { name: "rows", class: "FloatStorage", key: "0", numel: 24, offset: 16, shape: &[2, 2], stride: &[4, 1] },
        // Size-1 dims may have any stride and still be contiguous.
        Spec { name: "unit", class: "FloatStorage", key: "0", numel: 24, offset: 2, shape: &[1, 3], stride: &[99, 1] },
        // A broadcast (stride 0) row.
        Spec { name: "broadcast", class: "FloatStorage", key: "0", numel: 24, offset: 5, shape: &[3], stride: &[0] },
        Spec { name: "empty", class: "FloatStorage", key: "0", numel: 24, offset: 0, shape: &[0, 3], stride: &[3, 1] },
        Spec { name: "scalar", class: "FloatStorage", key: "0", numel: 24, offset: 23, shape: &[], stride: &[] },
    ]);
    write_torch_zip(
        &dir.join("pytorch_model.bin"),
        &pickle,
        &[("0", storage_0_to(24))],
        "little",
        ZipOptions::default(),
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let cases: [(&str, Vec<f32>, bool); 8] = [
        ("plain", vec![0., 1., 2., 3., 4., 5.], true),
        ("offset", vec![6., 7., 8., 9., 10., 11.], true),
        ("transposed", vec![12., 15., 13., 16., 14., 17.], false),
        ("rows", vec![16., 17., 20., 21.], false),
        ("unit", vec![2., 3., 4.], true),
        ("broadcast", vec![5., 5., 5.], false),
        ("empty", vec![], true),
        ("scalar", vec![23.], true),
    ];
    for (name, want, borrowed) in cases {
        assert_eq!(ckpt.to_f32(name).unwrap(), want, "{name}");
        assert_eq!(matches!(ckpt.bytes(name).unwrap(), Cow::Borrowed(_)), borrowed, "{name}");
    }
    assert_eq!(ckpt.info("transposed").unwrap().shape, vec![3, 2]);
    assert_eq!(ckpt.info("scalar").unwrap().shape, Vec::<usize>::new());
}

#[test]
fn half_and_bfloat16_storages() {
    let dir = TempDir::new("halves");
    let pickle = state_dict_pickle(&[
        Spec { name: "h", class: "HalfStorage", key: "0", numel: 2, offset: 0, shape: &[2], stride: &[1] },
        Spec { name: "b", class: "BFloat16Storage", key: "1", numel: 2, offset: 0, shape: &[2], stride: &[1] },
    ]);
    let storages = [("0", vec![0x00, 0x3c, 0x00, 0xc4]), ("1", vec![0x80, 0x3f, 0x40, 0xc0])];
    write_torch_zip(&dir.join("pytorch_model.bin"), &pickle, &storages, "little", ZipOptions::default());
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.info("h").unwrap().dtype, DType::F16);
    assert_eq!(ckpt.info("b").unwrap().dtype, DType::BF16);
    assert_eq!(ckpt.to_f32("h").unwrap(), vec![1.0, -4.0]);
    assert_eq!(ckpt.to_f32("b").unwrap(), vec![1.0, -3.0]);
}

/// `torch.save(model.state_dict())`: an OrderedDict with a `_metadata` attribute (BUILD),
/// tensors wrapped as parameters, memo references; and the same in protocol 4 opcodes.
#[test]
fn ordered_dict_state_dicts_with_metadata_and_parameters() {
    let dir = TempDir::new("ordered");
    let pickle = Pickle::new()
        .global("collections", "OrderedDict")
        .put(0)
        .op(b')')
        .reduce()
        .put(1)
        .mark()
        .str("w")
        .global("torch._utils", "_rebuild_parameter")
        .mark()
        .tensor("FloatStorage", "0", 4, 0, &[2, 2], &[2, 1])
        .op(0x88) // NEWTRUE: requires_grad
        .get(0) // OrderedDict class from the memo ...
        .op(b')')
        .reduce() // ... called again: backward hooks
        .tuple()
        .reduce()
        .str("v")
        .tensor("FloatStorage", "0", 4, 2, &[2], &[1])
        .op(b'u') // SETITEMS
        // state: {'_metadata': OrderedDict([('', {'version': 1})])}
        .op(b'}')
        .str("_metadata")
        .get(0)
        .op(b')')
        .reduce()
        .str("")
        .op(b'}')
        .str("version")
        .int(1)
        .op(b's')
        .op(b's')
        .op(b's')
        .op(b'b') // BUILD
        .stop();
    write_torch_zip(
        &dir.join("pytorch_model.bin"),
        &pickle,
        &[("0", storage_0_to(4))],
        "little",
        ZipOptions::default(),
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.names(), vec!["v", "w"]);
    assert_eq!(ckpt.to_f32("w").unwrap(), vec![0., 1., 2., 3.]);
    assert_eq!(ckpt.to_f32("v").unwrap(), vec![2., 3.]);

    // Protocol 4: FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL, BINFLOAT, LONG1, torch.Size.
    let p4 = Pickle(vec![0x80, 4])
        .op(0x95)
        .raw(&0u64.to_le_bytes())
        .op(b'}')
        .op(0x94)
        .short_str("w")
        .short_str("torch._utils")
        .short_str("_rebuild_tensor")
        .op(0x93)
        .op(0x94)
        .mark()
        .mark()
        .short_str("storage")
        .short_str("torch")
        .short_str("FloatStorage")
        .op(0x93)
        .short_str("0")
        .short_str("cpu")
        .op(0x8a)
        .raw(&[1, 4]) // LONG1 4
        .tuple()
        .op(b'Q')
        .op(b'K')
        .raw(&[0])
        .global("torch", "Size")
        .op(b'K')
        .raw(&[4])
        .op(0x85)
        .op(0x85)
        .reduce()
        .op(b'K')
        .raw(&[1])
        .op(0x85)
        .tuple()
        .reduce()
        .op(b's')
        .op(b'G')
        .raw(&1.5f64.to_be_bytes())
        .op(b'0') // POP
        .stop();
    write_torch_zip(&dir.join("pytorch_model.bin"), &p4, &[("0", storage_0_to(4))], "little", ZipOptions::default());
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.to_f32("w").unwrap(), vec![0., 1., 2., 3.]);
}

/// Real 13B shards are ~10 GB, so torch writes zip64 records: a fixture shard rewritten
/// in zip64 form must read the same.
#[test]
fn zip64_archives_read_the_same() {
    let src = TempDir::copy_of("models/tiny-a/bin-sharded-f16");
    for shard in ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"] {
        let entries = read_zip(&std::fs::read(src.join(shard)).unwrap());
        write_zip(&src.join(shard), &entries, ZipOptions { zip64: true, method: 0 });
    }
    let original = Checkpoint::open(&fixture("models/tiny-a/bin-sharded-f16")).unwrap();
    let rewritten = Checkpoint::open(src.path()).unwrap();
    assert_eq!(original.names(), rewritten.names());
    for name in original.names() {
        assert!(original.bytes(name).unwrap() == rewritten.bytes(name).unwrap(), "{name}");
    }
}

#[test]
fn compressed_entries_are_refused() {
    let dir = TempDir::new("deflate");
    let pickle = state_dict_pickle(&[Spec {
        name: "w",
        class: "FloatStorage",
        key: "0",
        numel: 1,
        offset: 0,
        shape: &[1],
        stride: &[1],
    }]);
    let bin = dir.join("pytorch_model.bin");
    write_torch_zip(&bin, &pickle, &[("0", vec![0; 4])], "little", ZipOptions { zip64: false, method: 8 });
    expect_err(
        Checkpoint::open(dir.path()),
        &[&bin.display().to_string(), "zip entry archive/data.pkl is compressed (method 8)", "torch.save"],
    );
}

#[test]
fn big_endian_checkpoints_are_refused() {
    let dir = TempDir::new("big");
    let pickle = state_dict_pickle(&[Spec {
        name: "w",
        class: "FloatStorage",
        key: "0",
        numel: 1,
        offset: 0,
        shape: &[1],
        stride: &[1],
    }]);
    write_torch_zip(&dir.join("pytorch_model.bin"), &pickle, &[("0", vec![0; 4])], "big", ZipOptions::default());
    expect_err(Checkpoint::open(dir.path()), &["byteorder \"big\"", "little-endian"]);
}

#[test]
fn storage_problems() {
    let dir = TempDir::new("storage");
    let bin = dir.join("pytorch_model.bin");
    let one = |class: &'static str, numel, offset, shape: &'static [usize]| {
        state_dict_pickle(&[Spec {
            name: "w",
            class,
            key: "0",
            numel,
            offset,
            shape,
            stride: &row_major(shape).leak()[..],
        }])
    };
    // The storage entry is missing.
    write_torch_zip(&bin, &one("FloatStorage", 4, 0, &[4]), &[], "little", ZipOptions::default());
    expect_err(Checkpoint::open(dir.path()), &["tensor w uses storage 0, but the archive has no entry archive/data/0"]);
    // The entry is smaller than the storage claims.
    write_torch_zip(&bin, &one("FloatStorage", 4, 0, &[4]), &[("0", vec![0; 8])], "little", ZipOptions::default());
    expect_err(Checkpoint::open(dir.path()), &["storage 0 of 4 elements, but its entry holds only 8 bytes"]);
    // The view reaches past its storage.
    write_torch_zip(&bin, &one("FloatStorage", 4, 2, &[4]), &[("0", vec![0; 16])], "little", ZipOptions::default());
    expect_err(Checkpoint::open(dir.path()), &["reaches past the 4 elements of storage 0"]);
    // An unsupported element type.
    write_torch_zip(&bin, &one("LongStorage", 1, 0, &[1]), &[("0", vec![0; 8])], "little", ZipOptions::default());
    let message = expect_err(Checkpoint::open(dir.path()), &[]);
    assert_eq!(
        message,
        format!(
            "unsupported dtype torch.LongStorage (int64) for tensor w in {}; vicuna reads F32, F16 and BF16",
            bin.display()
        )
    );
    // ... unless the tensor is one vicuna ignores.
    let pickle = state_dict_pickle(&[
        Spec {
            name: "model.layers.0.self_attn.rotary_emb.inv_freq",
            class: "LongStorage",
            key: "0",
            numel: 1,
            offset: 0,
            shape: &[1],
            stride: &[1],
        },
        Spec { name: "w", class: "FloatStorage", key: "1", numel: 1, offset: 0, shape: &[1], stride: &[1] },
    ]);
    write_torch_zip(&bin, &pickle, &[("0", vec![0; 8]), ("1", vec![0; 4])], "little", ZipOptions::default());
    assert_eq!(Checkpoint::open(dir.path()).unwrap().names(), vec!["w"]);
}

#[test]
fn not_a_torch_archive() {
    let dir = TempDir::new("notzip");
    let bin = dir.join("pytorch_model.bin");
    std::fs::write(&bin, b"\x80\x02}q\x00.").unwrap();
    expect_err(Checkpoint::open(dir.path()), &["legacy (pre-1.6) torch.save file"]);
    std::fs::write(&bin, vec![7u8; 100]).unwrap();
    expect_err(Checkpoint::open(dir.path()), &["is not a zip archive"]);
    write_zip(&bin, &[("readme.txt".to_string(), b"hi".to_vec())], ZipOptions::default());
    expect_err(Checkpoint::open(dir.path()), &["not a PyTorch checkpoint (it has no data.pkl)"]);
}
