package transport

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/hashicorp/yamux"
)

// ErrNeedTLS is matched by the error refusing a non-loopback address
// without TLS or Insecure.
var ErrNeedTLS = errors.New("TLS is required off loopback")

// errNeedTLS is ErrNeedTLS with what to do about it.
var errNeedTLS = fmt.Errorf("%w: give --tls-cert, --tls-key and --tls-ca, or --insecure", ErrNeedTLS)

// DefaultListen is the address `phaul serve` listens on by default.
const DefaultListen = "127.0.0.1:7070"

// TLSFiles names the PEM files of mutual TLS: this host's certificate and
// key, and the CA that signed the peer's certificate. All three or none.
type TLSFiles struct {
	CertFile string
	KeyFile  string
	CAFile   string
}

// Enabled reports whether any file is set.
func (t TLSFiles) Enabled() bool { return t.CertFile != "" || t.KeyFile != "" || t.CAFile != "" }

func (t TLSFiles) validate() error {
	if !t.Enabled() {
		return nil
	}
	if t.CertFile == "" || t.KeyFile == "" || t.CAFile == "" {
		return errors.New("TLS needs a certificate, a key and a CA file (mutual TLS), all three")
	}
	return nil
}

// Config is what both ends configure alike. The zero value of a duration or
// size means its default.
type Config struct {
	TLS TLSFiles
	// Insecure allows a connection without TLS off loopback.
	Insecure bool
	// HandshakeTimeout bounds connecting and the TLS handshake (default
	// 10 s).
	HandshakeTimeout time.Duration
	// KeepAliveInterval is the period of yamux pings; a peer that stops
	// answering ends the session (default 10 s).
	KeepAliveInterval time.Duration
	// WriteTimeout: a write blocked this long ends the session (default
	// 30 s).
	WriteTimeout time.Duration
	// StreamWindow is the largest yamux receive window of a stream
	// (default 4 MiB: 4 GB/s at 1 ms of round trip). A larger window
	// serves long fat links, at a cost: yamux grows its receive buffer
	// up to twice the window by reallocating it, fresh memory that the
	// kernel must fault in (a 16 MiB window cost the target 8% of its
	// CPU in a 1 GiB migration here, 1.6 s instead of 1.4 s).
	StreamWindow uint32
	// Logger receives connection events (default slog.Default()).
	Logger *slog.Logger
}

// Defaults of Config.
const (
	DefaultHandshakeTimeout  = 10 * time.Second
	DefaultKeepAliveInterval = 10 * time.Second
	DefaultWriteTimeout      = 30 * time.Second
	DefaultStreamWindow      = 4 << 20
)

func (c *Config) setDefaults() {
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if c.KeepAliveInterval == 0 {
		c.KeepAliveInterval = DefaultKeepAliveInterval
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = DefaultWriteTimeout
	}
	if c.StreamWindow == 0 {
		c.StreamWindow = DefaultStreamWindow
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

func (c *Config) validate() error {
	if err := c.TLS.validate(); err != nil {
		return err
	}
	if c.HandshakeTimeout < 0 || c.KeepAliveInterval < 0 || c.WriteTimeout < 0 {
		return errors.New("timeouts must not be negative")
	}
	if err := yamux.VerifyConfig(c.yamux()); err != nil {
		return fmt.Errorf("yamux: %w", err)
	}
	return nil
}

// yamux returns the session configuration (defaults must be set).
func (c *Config) yamux() *yamux.Config {
	y := yamux.DefaultConfig()
	y.EnableKeepAlive = true
	y.KeepAliveInterval = c.KeepAliveInterval
	y.ConnectionWriteTimeout = c.WriteTimeout
	y.MaxStreamWindowSize = c.StreamWindow
	y.StreamOpenTimeout = c.HandshakeTimeout
	y.StreamCloseTimeout = time.Minute
	y.LogOutput = nil
	y.Logger = yamuxLogger{c.Logger}
	return y
}

// ServerConfig configures a Listener.
type ServerConfig struct {
	// Listen is host:port (default DefaultListen).
	Listen string
	// MaxSessions bounds concurrent connections; more are closed at once
	// (default 16).
	MaxSessions int
	Config
}

// DefaultMaxSessions is the default of ServerConfig.MaxSessions.
const DefaultMaxSessions = 16

// Validate fills in defaults and checks the configuration, including the
// loopback rule for an IP literal or an empty host (a host name is checked
// once bound).
func (c *ServerConfig) Validate() error {
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.MaxSessions == 0 {
		c.MaxSessions = DefaultMaxSessions
	}
	c.setDefaults()
	if c.MaxSessions < 0 {
		return fmt.Errorf("transport: max sessions %d < 0", c.MaxSessions)
	}
	host, _, err := net.SplitHostPort(c.Listen)
	if err != nil {
		return fmt.Errorf("transport: listen address %q: %w", c.Listen, err)
	}
	if err := c.validate(); err != nil {
		return fmt.Errorf("transport: %w", err)
	}
	if !c.TLS.Enabled() && !c.Insecure {
		if host == "" {
			return fmt.Errorf("transport: listen on %s (every interface): %w", c.Listen, errNeedTLS)
		}
		if ip := net.ParseIP(host); ip != nil && !ip.IsLoopback() {
			return fmt.Errorf("transport: listen on %s: %w", c.Listen, errNeedTLS)
		}
	}
	return nil
}

// ClientConfig configures Dial.
type ClientConfig struct {
	// Address of the target, host:port.
	Address string
	// ServerName expected in the target's certificate (default: the host
	// of Address).
	ServerName string
	Config
}

// Validate fills in defaults and checks the configuration.
func (c *ClientConfig) Validate() error {
	c.setDefaults()
	host, _, err := net.SplitHostPort(c.Address)
	if err != nil {
		return fmt.Errorf("transport: target address %q: %w", c.Address, err)
	}
	if c.ServerName == "" {
		c.ServerName = host
	}
	if err := c.validate(); err != nil {
		return fmt.Errorf("transport: %w", err)
	}
	return nil
}

// yamuxLogger sends yamux's messages to slog at debug level.
type yamuxLogger struct{ l *slog.Logger }

func (y yamuxLogger) Print(v ...any) { y.l.Debug(fmt.Sprint(v...), "component", "yamux") }
func (y yamuxLogger) Printf(format string, v ...any) {
	y.l.Debug(fmt.Sprintf(format, v...), "component", "yamux")
}
func (y yamuxLogger) Println(v ...any) { y.l.Debug(fmt.Sprint(v...), "component", "yamux") }
