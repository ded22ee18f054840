package brokerclient_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/brokerclient"
)

// workerHelperEnv makes the test binary act as a worker process (see
// TestMain): it links to the brokers in the env, announces presence, says
// "ready" on stdout and waits to be killed.
const workerHelperEnv = "SHOAL_BC_WORKER_HELPER"

func runHelperWorker() int {
	var eps []brokerclient.Endpoint
	if err := json.Unmarshal([]byte(os.Getenv(workerHelperEnv)), &eps); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	c := brokerclient.New(brokerclient.Options{Name: "doomed-worker", Channels: historyRules})
	c.SetBrokers(eps)
	deadline := time.Now().Add(5 * time.Second)
	for c.Stats().Connected != len(eps) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	for i := range 50 {
		ch := "hist/room" + strconv.Itoa(i%5)
		if err := c.PresenceJoin(ch, brokerclient.PresenceEntry{Conn: "conn-" + strconv.Itoa(i), User: "u" + strconv.Itoa(i)}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	fmt.Println("ready")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n') // until killed
	return 0
}

// TestPresenceNoGhostsAfterWorkerSIGKILL: a worker process with 50
// presence entries over 5 channels on 2 brokers is SIGKILLed; every entry
// is gone well within 10 s, with leave events.
func TestPresenceNoGhostsAfterWorkerSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a worker process")
	}
	dir := runDir(t)
	b1 := startHistoryBroker(t, dir, "broker-1")
	b2 := startHistoryBroker(t, dir, "broker-2")
	all := []brokerclient.Endpoint{b1.ep, b2.ep}
	obs, _ := newClient(t, "observer", withRules)
	obs.SetBrokers(all)
	waitConnected(t, obs, 2)

	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	epsJSON, _ := json.Marshal(all)
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), workerHelperEnv+"="+string(epsJSON))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("worker process said %q, %v", line, err)
	}
	ctx := context.Background()
	total := func() int {
		n := 0
		for i := range 5 {
			c, err := obs.PresenceCount(ctx, "hist/room"+strconv.Itoa(i))
			if err != nil {
				t.Fatal(err)
			}
			n += c
		}
		return n
	}
	waitFor(t, 5*time.Second, "50 entries", func() bool { return total() == 50 })
	if uc, err := obs.UserChannels(ctx, "u7"); err != nil || len(uc) != 1 {
		t.Fatalf("user channels %v %v", uc, err)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	waitFor(t, 10*time.Second, "no ghosts after SIGKILL", func() bool { return total() == 0 })
	t.Logf("presence of a SIGKILLed worker gone after %v", time.Since(start))
	if uc, err := obs.UserChannels(ctx, "u7"); err != nil || len(uc) != 0 {
		t.Fatalf("user channels after the kill %v %v", uc, err)
	}
}
