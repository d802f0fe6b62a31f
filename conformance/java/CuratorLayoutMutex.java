// A stand-in for Apache Curator's InterProcessMutex (Curator's jar is not installable
// here), written against the plain ZooKeeper Java client. It follows Curator's
// LockInternals + StandardLockInternalsDriver algorithm step for step:
//
//   acquire: create EPHEMERAL_SEQUENTIAL "{base}/_c_{uuid}-lock-" (Curator's protected
//            mode), creating parents if needed; then loop: list the children, sort them
//            by the text after the last "lock-", our index 0 holds; otherwise getData
//            with a watcher on the child just before ours and wait for any event (or the
//            remaining time; on timeout delete our node and fail).
//   release: delete our node.
//
// Driven over stdin/stdout by the conformance test, one command a line:
//   acquire <millis>  ->  "acquired <path>" | "timeout"
//   release           ->  "released"
//   quit              ->  exits
// Usage: java CuratorLayoutMutex <connect string> <lock base path>

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.apache.zookeeper.CreateMode;
import org.apache.zookeeper.KeeperException;
import org.apache.zookeeper.Watcher;
import org.apache.zookeeper.ZooDefs;
import org.apache.zookeeper.ZooKeeper;

public final class CuratorLayoutMutex {
    private static final String LOCK_NAME = "lock-";
    private static final String PROTECTED_PREFIX = "_c_";

    private final ZooKeeper zk;
    private final String base;
    private final Object monitor = new Object();
    private String ourPath;

    private CuratorLayoutMutex(ZooKeeper zk, String base) {
        this.zk = zk;
        this.base = base;
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: CuratorLayoutMutex <connect string> <lock base path>");
            System.exit(2);
        }
        CountDownLatch connected = new CountDownLatch(1);
        ZooKeeper zk = new ZooKeeper(args[0], 10_000, event -> {
            if (event.getState() == Watcher.Event.KeeperState.SyncConnected) {
                connected.countDown();
            }
        });
        if (!connected.await(30, TimeUnit.SECONDS)) {
            System.err.println("no ZooKeeper session within 30 s");
            System.exit(3);
        }
        CuratorLayoutMutex mutex = new CuratorLayoutMutex(zk, args[1]);
        System.out.println("ready");
        System.out.flush();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            String[] words = line.trim().split("\\s+");
            switch (words[0]) {
                case "acquire": {
                    String path = mutex.acquire(Long.parseLong(words[1]));
                    System.out.println(path == null ? "timeout" : "acquired " + path);
                    break;
                }
                case "release":
                    mutex.release();
                    System.out.println("released");
                    break;
                case "quit":
                    zk.close();
                    return;
                default:
                    System.out.println("unknown command: " + line);
            }
            System.out.flush();
        }
        zk.close();
    }

    /** Curator's attemptLock: our path if granted within millisToWait, else null. */
    private String acquire(long millisToWait) throws Exception {
        long start = System.currentTimeMillis();
        String prefix = base + "/" + PROTECTED_PREFIX + UUID.randomUUID() + "-" + LOCK_NAME;
        String path = createWithParents(prefix);
        if (lockLoop(start, millisToWait, path)) {
            ourPath = path;
            return path;
        }
        return null;
    }

    private String createWithParents(String prefix) throws Exception {
        for (int attempt = 0; attempt < 10; attempt++) {
            try {
                return zk.create(prefix, new byte[0], ZooDefs.Ids.OPEN_ACL_UNSAFE,
                        CreateMode.EPHEMERAL_SEQUENTIAL);
            } catch (KeeperException.NoNodeException e) {
                makeParents(base);
            }
        }
        throw new IllegalStateException("could not create the parents of " + prefix);
    }

    private void makeParents(String path) throws Exception {
        StringBuilder at = new StringBuilder();
        for (String part : path.split("/")) {
            if (part.isEmpty()) {
                continue;
            }
            at.append('/').append(part);
            try {
                zk.create(at.toString(), new byte[0], ZooDefs.Ids.OPEN_ACL_UNSAFE, CreateMode.PERSISTENT);
            } catch (KeeperException.NodeExistsException ignored) {
                // someone else made it
            }
        }
    }

    /** Curator's internalLockLoop with StandardLockInternalsDriver.getsTheLock, maxLeases 1. */
    private boolean lockLoop(long startMillis, long millisToWait, String path) throws Exception {
        String ourName = path.substring(base.length() + 1);
        boolean doDelete = false;
        try {
            while (true) {
                List<String> children = sortedChildren();
                int ourIndex = children.indexOf(ourName);
                if (ourIndex < 0) {
                    throw new KeeperException.NoNodeException("lost our node " + ourName);
                }
                if (ourIndex == 0) {
                    return true;
                }
                String previous = base + "/" + children.get(ourIndex - 1);
                synchronized (monitor) {
                    try {
                        // getData, not exists: no watch is left behind on a missing node.
                        zk.getData(previous, event -> {
                            synchronized (monitor) {
                                monitor.notifyAll();
                            }
                        }, null);
                        long now = System.currentTimeMillis();
                        millisToWait -= now - startMillis;
                        startMillis = now;
                        if (millisToWait <= 0) {
                            doDelete = true;
                            return false;
                        }
                        monitor.wait(millisToWait);
                    } catch (KeeperException.NoNodeException gone) {
                        // released between the listing and the watch: look again
                    }
                }
            }
        } catch (Exception e) {
            doDelete = true;
            throw e;
        } finally {
            if (doDelete) {
                deleteQuietly(path);
            }
        }
    }

    /** The children sorted by what follows the last "lock-" (standardFixForSorting). */
    private List<String> sortedChildren() throws Exception {
        List<String> children = new ArrayList<>(zk.getChildren(base, false));
        children.sort((a, b) -> fixForSorting(a).compareTo(fixForSorting(b)));
        return children;
    }

    private static String fixForSorting(String child) {
        int index = child.lastIndexOf(LOCK_NAME);
        if (index >= 0) {
            index += LOCK_NAME.length();
            return index <= child.length() ? child.substring(index) : "";
        }
        return child;
    }

    private void release() throws Exception {
        if (ourPath == null) {
            throw new IllegalMonitorStateException("not held");
        }
        deleteQuietly(ourPath);
        ourPath = null;
    }

    private void deleteQuietly(String path) throws Exception {
        try {
            zk.delete(path, -1);
        } catch (KeeperException.NoNodeException ignored) {
            // already gone (session expired)
        }
    }
}
