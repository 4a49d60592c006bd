// Package hostinfo owns the facts a host advertises in a migration's Hello:
// page size, kernel release and features, the xsave state components the
// CPU enables for user space (XCR0), and the CPU's identification and flags.
// It collects them; package protocol decides what they mean for a
// migration.
package hostinfo
