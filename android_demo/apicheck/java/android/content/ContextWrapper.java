// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.content;

import java.io.File;

public class ContextWrapper extends Context {
    public ContextWrapper(Context base) {
        throw new UnsupportedOperationException("declaration only");
    }

    @Override
    public File getExternalFilesDir(String type) {
        throw new UnsupportedOperationException("declaration only");
    }
}
