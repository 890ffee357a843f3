//! The memory allocator of every orderflow process: mimalloc instead of the
//! C library's malloc. Linked into every binary through this crate.
//!
//! Why: a profile of `orderflow bench` at concurrency 200 found about a
//! tenth of orderflow's own CPU in glibc's malloc and free, a good part of
//! it in `posix_memalign` for the 128-byte-aligned cells of tokio's tasks
//! (one per delivery, HTTP request and database call) and in glibc's
//! consolidation of its free lists. BENCHMARKS.md ("Sixth sitting") has the
//! figures before and after.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
