// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in ONNX Runtime's Java API.
package ai.onnxruntime;

import java.util.Map;

public class OrtSession implements AutoCloseable {
    private OrtSession() {} // made by OrtEnvironment.createSession

    public Result run(Map<String, ? extends OnnxTensorLike> inputs, Map<String, ? extends OnnxValue> pinnedOutputs)
            throws OrtException {
        throw new UnsupportedOperationException("declaration only");
    }

    @Override
    public void close() throws OrtException {
        throw new UnsupportedOperationException("declaration only");
    }

    public static class SessionOptions implements AutoCloseable {
        public SessionOptions() {
            throw new UnsupportedOperationException("declaration only");
        }

        @Override
        public void close() {
            throw new UnsupportedOperationException("declaration only");
        }

        public void setOptimizationLevel(OptLevel level) throws OrtException {
            throw new UnsupportedOperationException("declaration only");
        }

        public void setExecutionMode(ExecutionMode mode) throws OrtException {
            throw new UnsupportedOperationException("declaration only");
        }

        public void setInterOpNumThreads(int numThreads) throws OrtException {
            throw new UnsupportedOperationException("declaration only");
        }

        public void setIntraOpNumThreads(int numThreads) throws OrtException {
            throw new UnsupportedOperationException("declaration only");
        }

        public void setMemoryPatternOptimization(boolean memoryPatternOptimization) throws OrtException {
            throw new UnsupportedOperationException("declaration only");
        }

        public void addConfigEntry(String configKey, String configValue) throws OrtException {
            throw new UnsupportedOperationException("declaration only");
        }

        // All the real constants (LAYOUT_OPT is in the newer releases), so a `when` over them is checked as on the
        // device; their int ids and getID() are not declared.
        public enum OptLevel {
            NO_OPT,
            BASIC_OPT,
            EXTENDED_OPT,
            LAYOUT_OPT,
            ALL_OPT
        }

        public enum ExecutionMode {
            SEQUENTIAL,
            PARALLEL
        }
    }

    // Real: implements AutoCloseable, Iterable<Map.Entry<String, OnnxValue>> (the shell uses no member of it).
    public static class Result {
        private Result() {}
    }
}
