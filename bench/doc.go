// Package bench measures migrations the way users judge them: the pause
// the application itself saw (its largest gap between heartbeats around
// the migration), phaul's own frozen time and where it went, total time,
// bytes on the wire, rounds and per-round figures, and the CPU phaul used
// on each side. It is what `phaul bench` runs.
//
// RunBench builds two host-like namespaces (Hosts: the target runs phaul
// serve in a PID namespace of its own, fresh for every run), and for each
// point of the matrix (memory size × dirty rate × compared variant ×
// repeat, interleaved) starts the built-in workload (package
// bench/workload) or a user's command on the source, migrates it with
// `phaul migrate --json`, reads the workload's heartbeats, and has the
// workload verify its memory on the target. What cannot be run (CRIU
// without a 4.x criu) is reported as a note, never faked. Results are
// written as JSON, a Markdown report with medians and spreads
// (WriteMarkdown), and SVG plots (Plots).
//
// Before the runs, the bench measures the three rates that bound a
// migration's total time (Bandwidth): how fast process_vm_readv reads
// memory, the TCP throughput from the source host to the target host, and
// the page codec's throughput on the workload's data. A run's bound is its
// memory size over the slowest of them; the target is a total time of at
// most BoundFactor (1.3) times the bound.
//
// With Config.TCPClients the workload is also a server, and clients on a
// third host (NewClientHosts) stay connected to it through each
// migration, which carries the connections and moves the service address
// with an action script: the stall a connected client saw is measured
// next to the process's own downtime, and a client that loses, duplicates
// or corrupts a message fails the run.
//
// The hot paths of a migration have Go benchmarks in bench/hotpath.
package bench
