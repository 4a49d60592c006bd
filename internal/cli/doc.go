// Package cli implements the phaul command line: one file per subcommand,
// each turning flags into a Config for the package that does the work and
// printing its result (text for people, --json for scripts).
package cli
