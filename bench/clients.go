package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/phaul/phaul/bench/workload"
)

// clientModes are the modes TCP clients take in turn.
var clientModes = []workload.Mode{workload.ModeNormal, workload.ModeLazyServer, workload.ModeBulk}

// udpInterval is the time between two datagrams of the UDP client.
const udpInterval = 10 * time.Millisecond

// clientWait bounds how long the clients may go without traffic before and
// after a migration, and how long an orderly close may take.
const clientWait = 20 * time.Second

// clientSet is the clients of one run: TCP clients in the modes of
// clientModes, in turn, and one UDP client.
type clientSet struct {
	tcp   []*workload.TCPClient
	modes []workload.Mode
	udp   *workload.UDPClient
}

// startClients connects n TCP clients to tcpAddr and a UDP client to
// udpAddr with dial. On error the clients already started are closed.
func startClients(dial func(network, addr string) (net.Conn, error), n int, tcpAddr, udpAddr string) (*clientSet, error) {
	cs := &clientSet{}
	fail := func(err error) (*clientSet, error) {
		cs.abort()
		return nil, err
	}
	for i := 0; i < n; i++ {
		mode := clientModes[i%len(clientModes)]
		conn, err := dial("tcp", tcpAddr)
		if err != nil {
			return fail(fmt.Errorf("tcp client %d (%v): connect to %s: %w", i+1, mode, tcpAddr, err))
		}
		c, err := workload.NewTCPClient(conn, workload.TCPClientConfig{ID: uint64(i + 1), Mode: mode})
		if err != nil {
			conn.Close()
			return fail(err)
		}
		cs.tcp, cs.modes = append(cs.tcp, c), append(cs.modes, mode)
	}
	conn, err := dial("udp", udpAddr)
	if err != nil {
		return fail(fmt.Errorf("udp client: socket to %s: %w", udpAddr, err))
	}
	uc, ok := conn.(*net.UDPConn)
	if !ok {
		conn.Close()
		return fail(fmt.Errorf("udp client: %T is not a UDP socket", conn))
	}
	if cs.udp, err = workload.NewUDPClient(uc, udpInterval); err != nil {
		conn.Close()
		return fail(err)
	}
	return cs, nil
}

// name names TCP client i in messages.
func (cs *clientSet) name(i int) string {
	return fmt.Sprintf("tcp client %d (%v)", i+1, cs.modes[i])
}

// waitTraffic waits until every client has received more than it had at
// the call; it fails on any error a client saw, and after timeout.
func (cs *clientSet) waitTraffic(ctx context.Context, what string, timeout time.Duration) error {
	base := make([]int64, len(cs.tcp))
	for i, c := range cs.tcp {
		base[i] = c.Stats().Received
	}
	ubase := cs.udp.Stats().Answered
	deadline := time.Now().Add(timeout)
	for {
		var pending []string
		for i, c := range cs.tcp {
			st := c.Stats()
			if st.Err != nil {
				return fmt.Errorf("%s: %s: %w", what, cs.name(i), st.Err)
			}
			if st.Received <= base[i] {
				pending = append(pending, cs.name(i))
			}
		}
		ust := cs.udp.Stats()
		if ust.Err != nil {
			return fmt.Errorf("%s: udp client: %w", what, ust.Err)
		}
		if ust.Answered <= ubase {
			pending = append(pending, "the udp client")
		}
		if len(pending) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: no traffic within %v for %s", what, timeout, strings.Join(pending, ", "))
		}
		if err := sleep(ctx, 10*time.Millisecond); err != nil {
			return err
		}
	}
}

// close ends every client in order: each TCP client checks that both
// directions carried every message exactly once, in order, and the UDP
// client that every answer was right. It returns the final stats and
// every error, joined.
func (cs *clientSet) close(ctx context.Context) ([]workload.TCPStats, workload.UDPStats, error) {
	var errs []error
	stats := make([]workload.TCPStats, len(cs.tcp))
	for i, c := range cs.tcp {
		cctx, cancel := context.WithTimeout(ctx, clientWait)
		st, err := c.Close(cctx)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", cs.name(i), err))
		}
		stats[i] = st
	}
	ust, err := cs.udp.Close(ctx)
	if err != nil {
		errs = append(errs, fmt.Errorf("udp client: %w", err))
	}
	return stats, ust, errors.Join(errs...)
}

// abort closes every client at once, without the orderly end (a no-op
// for clients already closed).
func (cs *clientSet) abort() {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, c := range cs.tcp {
		_, _ = c.Close(ctx)
	}
	if cs.udp != nil {
		_, _ = cs.udp.Close(ctx)
	}
}

// overlaps reports whether the gap from gapStart to gapEnd overlaps the
// window from start to end.
func overlaps(gapStart, gapEnd, start, end time.Time) bool {
	return !gapStart.IsZero() && gapStart.Before(end) && gapEnd.After(start)
}

// ErrNoStall reports that no client's largest gap fell in the migration,
// so the stall it caused cannot be told.
var ErrNoStall = errors.New("no TCP client's largest gap overlaps the migration")

// windowStall returns the stall TCP clients saw during the window from
// start to end: the largest of their largest gaps (TCPStats.MaxGap) that
// overlap the window. A client whose largest gap lies elsewhere is left
// out: its stall during the window was smaller (a bulk client reading
// what its receive queue still held, for one). It fails with ErrNoStall
// when no client's does: the stall during the window is then not known,
// only bounded.
func windowStall(stats []workload.TCPStats, start, end time.Time) (time.Duration, error) {
	var stall time.Duration
	found := false
	for _, st := range stats {
		if overlaps(st.GapStart, st.GapEnd, start, end) {
			stall, found = max(stall, st.MaxGap), true
		}
	}
	if found {
		return stall, nil
	}
	var gaps []string
	for i, st := range stats {
		gaps = append(gaps, fmt.Sprintf("client %d: %.1f ms from %+.0f ms", i+1, millis(st.MaxGap), since(st.GapStart, start)))
	}
	return 0, fmt.Errorf("%w (%.0f ms long; %s)", ErrNoStall, millis(end.Sub(start)), strings.Join(gaps, ", "))
}

// millis returns d in milliseconds.
func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// since returns the milliseconds from start to t (0 for no time).
func since(t, start time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return millis(t.Sub(start))
}

// readyAddrs returns the TCP and UDP addresses of a workload's READY line
// ("" for one it does not serve).
func readyAddrs(line string) (tcp, udp string) {
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, "tcp="); ok {
			tcp = v
		}
		if v, ok := strings.CutPrefix(f, "udp="); ok {
			udp = v
		}
	}
	return tcp, udp
}

// ClientResult is what one client saw in a run.
type ClientResult struct {
	// ID is the TCP connection's id (0 for the UDP client).
	ID uint64 `json:"id,omitempty"`
	// Mode is the TCP connection's mode (normal, lazy-server, bulk), or
	// "udp".
	Mode string `json:"mode"`
	// Sent and Received count messages (for UDP: datagrams sent and
	// answered; Lost is those never answered).
	Sent     int64 `json:"sent"`
	Received int64 `json:"received"`
	Lost     int64 `json:"lost,omitempty"`
	// MaxGapMS is the largest gap between two messages received; it
	// started GapStartMS after the start of the migration (negative:
	// before).
	MaxGapMS   float64 `json:"max_gap_ms"`
	GapStartMS float64 `json:"gap_start_ms"`
	// InMigration is set when that gap overlaps the migration.
	InMigration bool `json:"in_migration"`
}

// clientResults describes the clients' final stats, with times relative
// to start.
func clientResults(tcp []workload.TCPStats, modes []workload.Mode, udp workload.UDPStats, start, end time.Time) []ClientResult {
	var out []ClientResult
	for i, st := range tcp {
		out = append(out, ClientResult{ID: uint64(i + 1), Mode: modes[i].String(), Sent: st.Sent, Received: st.Received,
			MaxGapMS: millis(st.MaxGap), GapStartMS: since(st.GapStart, start), InMigration: overlaps(st.GapStart, st.GapEnd, start, end)})
	}
	return append(out, ClientResult{Mode: "udp", Sent: udp.Sent, Received: udp.Answered, Lost: udp.Lost,
		MaxGapMS: millis(udp.MaxGap), GapStartMS: since(udp.GapStart, start), InMigration: overlaps(udp.GapStart, udp.GapEnd, start, end)})
}
