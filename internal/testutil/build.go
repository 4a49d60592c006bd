package testutil

import (
	"bytes"
	"errors"
	"fmt"
	"go/build"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// ErrNoTool is matched (errors.Is) by build errors caused by a missing tool
// (gcc, python3, go); tests skip on it rather than fail.
var ErrNoTool = errors.New("tool not installed")

// LookTool finds a tool in PATH. The error matches ErrNoTool.
func LookTool(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("%s: %w (%v)", name, ErrNoTool, err)
	}
	return p, nil
}

// GoCommand returns the go command: the one in PATH, else the one of the
// toolchain that built this test.
func GoCommand() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	for _, root := range []string{os.Getenv("GOROOT"), build.Default.GOROOT} {
		if root == "" {
			continue
		}
		p := filepath.Join(root, "bin", "go")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("go: %w (not in PATH, no GOROOT)", ErrNoTool)
}

// ModuleRoot returns the directory holding the go.mod that encloses the
// current working directory (a test runs in its package's directory).
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod above %s", dir)
		}
	}
}

// CompileC compiles one C source file into out with gcc -O2 -Wall and the
// extra flags (for instance "-static" or "-pthread"). The source's
// directory is on the include path.
func CompileC(src, out string, flags ...string) error {
	gcc, err := LookTool("gcc")
	if err != nil {
		return err
	}
	args := []string{"-O2", "-g", "-Wall", "-I", filepath.Dir(src), "-o", out, src}
	return run(exec.Command(gcc, append(args, flags...)...), "gcc "+filepath.Base(src))
}

// CompileGo builds the Go main package in pkgDir into out; flags go to
// `go build` before the package.
func CompileGo(pkgDir, out string, flags ...string) error {
	goCmd, err := GoCommand()
	if err != nil {
		return err
	}
	args := append([]string{"build", "-o", out}, flags...)
	cmd := exec.Command(goCmd, append(args, ".")...)
	cmd.Dir = pkgDir
	return run(cmd, "go build "+pkgDir)
}

// CompilePhaul builds the phaul command (./cmd/phaul of this module) into out.
func CompilePhaul(out string) error {
	root, err := ModuleRoot()
	if err != nil {
		return err
	}
	return CompileGo(filepath.Join(root, "cmd", "phaul"), out)
}

func run(cmd *exec.Cmd, what string) error {
	var buf bytes.Buffer
	cmd.Stdout = &buf
	cmd.Stderr = &buf
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w\n%s", what, err, strings.TrimSpace(buf.String()))
	}
	return nil
}

// BuildC compiles src into out (see CompileC). It skips the test when gcc
// is missing and fails it when compilation fails. It returns out.
func BuildC(tb testing.TB, src, out string, flags ...string) string {
	tb.Helper()
	if err := CompileC(src, out, flags...); err != nil {
		skipOrFatal(tb, err)
	}
	return out
}

// BuildGo builds the Go main package in pkgDir into out (see CompileGo).
func BuildGo(tb testing.TB, pkgDir, out string, flags ...string) string {
	tb.Helper()
	if err := CompileGo(pkgDir, out, flags...); err != nil {
		skipOrFatal(tb, err)
	}
	return out
}

// PhaulBinary builds the phaul command into dir and returns its path.
func PhaulBinary(tb testing.TB, dir string) string {
	tb.Helper()
	out := filepath.Join(dir, "phaul")
	if err := CompilePhaul(out); err != nil {
		skipOrFatal(tb, err)
	}
	return out
}

// SkipOrFatal skips tb when err comes from a missing tool, else fails it.
func SkipOrFatal(tb testing.TB, err error) {
	tb.Helper()
	skipOrFatal(tb, err)
}

func skipOrFatal(tb testing.TB, err error) {
	tb.Helper()
	if errors.Is(err, ErrNoTool) {
		tb.Skipf("skipped: %v", err)
	}
	tb.Fatalf("build failed: %v", err)
}
