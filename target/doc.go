// Package target is the receiving side of a live migration, the Control
// service phaul serve runs for each connection: it answers Hello, keeps a
// page store per migration, builds a stopped shadow process per migrated
// process from each round's layout and writes pages into it as they
// arrive, applies the final state on Restore, and lets the process run
// only on Commit. Anything that ends before Commit (Abort, an error, the
// connection dropping) kills the shadow: the process is never lost, and
// never runs twice.
package target
