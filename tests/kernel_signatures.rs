//! The registry (src/cuda/registry.rs) against the kernels' C source: every `extern "C"`
//! kernel of `kernels/*.cu` is an entry of its module and the other way round, with the same
//! parameters in the same order, each pointer to the C type the entry declares and each
//! struct by name. Every launch is checked against the registry (`Launch`), so this ties each
//! launcher's buffers to the C signature; it reads only the source, so it runs without nvcc or
//! a GPU (the PTX tests compare only counts and sizes, and need the CUDA tools).
#![cfg(feature = "cuda")]

use std::path::Path;

use alexnet_cuda::cuda::registry::{Param, Pointee, KERNELS, MODULES};

/// One parameter of a C signature: the type without `const`, `__restrict__` or the name, and
/// whether it is a pointer.
#[derive(Debug, PartialEq)]
struct CParam {
    ty: String,
    pointer: bool,
}

/// `text` without its `/* */` and `//` comments.
fn without_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let block = rest.find("/*");
        let line = rest.find("//");
        match (block, line) {
            (Some(b), l) if l.is_none_or(|l| b < l) => {
                out.push_str(&rest[..b]);
                let end = rest[b + 2..].find("*/").expect("an unterminated comment");
                rest = &rest[b + 2 + end + 2..];
            }
            (_, Some(l)) => {
                out.push_str(&rest[..l]);
                rest = rest[l..].find('\n').map_or("", |n| &rest[l + n..]);
            }
            _ => {
                out.push_str(rest);
                return out;
            }
        }
    }
}

/// The `extern "C" __global__ void name(params)` kernels of a `.cu` source, in order.
fn c_kernels(source: &str) -> Vec<(String, Vec<CParam>)> {
    let code = without_comments(source);
    let mut kernels = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("extern \"C\"") {
        rest = &rest[at + "extern \"C\"".len()..];
        let head = rest.trim_start();
        let Some(after) = head.strip_prefix("__global__") else {
            continue;
        };
        let after = after
            .trim_start()
            .strip_prefix("void")
            .expect("a kernel returns void");
        let after = skip_launch_bounds(after);
        let open = after.find('(').expect("a parameter list");
        let close = after.find(')').expect("a closed parameter list");
        let name = after[..open].trim().to_string();
        let params = after[open + 1..close]
            .split(',')
            .map(|param| {
                let spaced = param.replace('*', " * ");
                let tokens: Vec<&str> = spaced
                    .split_whitespace()
                    .filter(|t| !matches!(*t, "const" | "__restrict__"))
                    .collect();
                let (_name, ty) = tokens.split_last().expect("a named parameter");
                CParam {
                    ty: ty
                        .iter()
                        .filter(|t| **t != "*")
                        .copied()
                        .collect::<Vec<_>>()
                        .join(" "),
                    pointer: ty.contains(&"*"),
                }
            })
            .collect();
        kernels.push((name, params));
        rest = &after[close..];
    }
    kernels
}

/// `text` past a leading `__launch_bounds__(...)` (a kernel's register budget for its largest
/// block, written between `void` and the name), or all of it.
fn skip_launch_bounds(text: &str) -> &str {
    match text.trim_start().strip_prefix("__launch_bounds__") {
        Some(bounds) => {
            let close = bounds.find(')').expect("a closed __launch_bounds__");
            &bounds[close + 1..]
        }
        None => text,
    }
}

/// A registry parameter as C spells it in the entry of storage type `dtype`.
fn as_c(param: Param, dtype: alexnet_cuda::cuda::GpuDtype) -> CParam {
    match param.resolved(dtype) {
        Param::Ptr(pointee) => CParam {
            ty: pointee
                .c_type()
                .expect("a resolved pointee has a C type")
                .to_string(),
            pointer: true,
        },
        Param::Struct(name, _) => CParam {
            ty: name.to_string(),
            pointer: false,
        },
    }
}

fn module_source(module: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("kernels")
        .join(format!("{module}.cu"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// How many times `__global__` occurs in `source` outside comments and preprocessor lines (the
/// host emulation's header defines it away): every kernel the parser must have found.
fn global_count(source: &str) -> usize {
    without_comments(source)
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .map(|line| line.matches("__global__").count())
        .sum()
}

#[test]
fn every_registry_entry_has_the_parameters_of_its_c_signature() {
    let mut problems = Vec::new();
    let mut seen = 0;
    for module in MODULES {
        let source = module_source(module);
        let kernels = c_kernels(&source);
        // A kernel written another way (an `extern "C" {` block, a qualifier before
        // `__global__`, a macro) would be passed over here, registry entry or not.
        if kernels.len() != global_count(&source) {
            problems.push(format!(
                "{module}.cu: {} kernels read, {} `__global__` in the source: write each as \
                 `extern \"C\" __global__ void name(...)`",
                kernels.len(),
                global_count(&source)
            ));
        }
        for spec in KERNELS.iter().filter(|k| k.module == *module) {
            let Some((_, c_params)) = kernels.iter().find(|(name, _)| name == spec.name) else {
                problems.push(format!("{module}.cu defines no kernel {}", spec.name));
                continue;
            };
            seen += 1;
            let declared: Vec<CParam> = spec.params.iter().map(|&p| as_c(p, spec.dtype)).collect();
            if &declared != c_params {
                problems.push(format!(
                    "{}: the registry declares {declared:?}, kernels/{module}.cu {c_params:?}",
                    spec.name
                ));
            }
        }
        for (name, _) in &kernels {
            if !KERNELS
                .iter()
                .any(|k| k.module == *module && k.name == name)
            {
                problems.push(format!("{module}.cu: kernel {name} is not in the registry"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(seen, KERNELS.len(), "every entry was compared");
}

/// Kernels live in the modules only: the headers the modules include hold device functions,
/// which no registry entry could name.
#[test]
fn no_header_defines_a_kernel() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut headers = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let is_header = path.extension().is_some_and(|e| e == "h" || e == "cuh");
        if is_header {
            headers += 1;
            let source = std::fs::read_to_string(&path).unwrap();
            assert_eq!(
                global_count(&source),
                0,
                "{} defines a kernel",
                path.display()
            );
        }
    }
    assert!(headers > 0, "no header found in {}", dir.display());
}

#[test]
fn the_parser_reads_pointers_types_and_comments() {
    let source = "/* extern \"C\" __global__ void hidden(int x) */\n\
                  // extern \"C\" __global__ void also_hidden(int x)\n\
                  extern \"C\" __global__ void k(const unsigned short *__restrict__ a,\n\
                  float* b, AlexnetLrnParams p) { }\n\
                  extern \"C\" void host_only(int x);\n\
                  extern \"C\" __global__ void __launch_bounds__(1024)\n\
                  bounded(float *a) { }\n";
    let found = c_kernels(source);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(global_count(source), 2);
    let bounded = CParam {
        ty: "float".to_string(),
        pointer: true,
    };
    assert_eq!(found[1], ("bounded".to_string(), vec![bounded]));
    // A kernel the parser cannot read still counts, so the module check reports it.
    let block = "extern \"C\" {\n__global__ void blocky(float *a) {}\n}\n#define __global__\n";
    assert_eq!((c_kernels(block).len(), global_count(block)), (0, 1));
    let (name, params) = &found[0];
    assert_eq!(name, "k");
    let c = |ty: &str, pointer| CParam {
        ty: ty.to_string(),
        pointer,
    };
    assert_eq!(
        params,
        &[
            c("unsigned short", true),
            c("float", true),
            c("AlexnetLrnParams", false)
        ]
    );
    // The storage type resolves per entry.
    let f16 = as_c(
        Param::Ptr(Pointee::Storage),
        alexnet_cuda::cuda::GpuDtype::F16,
    );
    assert_eq!(f16, c("unsigned short", true));
}
